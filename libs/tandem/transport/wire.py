"""What the data plane's messages look like: headers, message kinds, tags, dtype codes, and bounded waits.

Every message starts with a fixed-size int64 header (`HEADER_LEN` fields) so the receiver can size the
payload buffers before posting them; payload tensors follow in a fixed order, each on its own tag, so two
kinds of message never match each other's receives.
"""

from __future__ import annotations

import time
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist

HEADER_LEN = 9

# gloo's timeouts are per wait; an idle receiver waits this long instead (a timed-out gloo wait closes
# every connection of the group in this process, so idling must never time out)
IDLE_WAIT = timedelta(days=365)


class TransportError(RuntimeError):
    """A peer did not answer in time, its connection broke, or it broke the protocol."""


class Kind(IntEnum):
    EXPERT_REQUEST = 1
    EXPERT_RESULT = 2
    EXPERT_ERROR = 3  # the server could not run the request; the result tensor that follows is zeros
    SHUTDOWN = 4  # header only: the expert server leaves its serve loop


class Tag(IntEnum):
    """One tag per message part; gloo matches a receive to the oldest send with the same (peer, tag)."""

    REQUEST_HEADER = 100
    REQUEST_ROWS = 101
    REQUEST_PAIRS = 102
    REQUEST_WEIGHTS = 103
    RESULT_HEADER = 110
    RESULT_ROWS = 111
    KV_HEADER = 200
    KV_DATA = 201


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
           torch.float8_e4m3fn]
_CODES = {dtype: code for code, dtype in enumerate(_DTYPES)}


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _CODES:
        raise ValueError(f"the data plane does not carry {dtype}")
    return _CODES[dtype]


def code_dtype(code: int) -> torch.dtype:
    if not 0 <= code < len(_DTYPES):
        raise TransportError(f"unknown dtype code {code} in a header")
    return _DTYPES[code]


def make_header(*fields: int, device: torch.device) -> torch.Tensor:
    """[HEADER_LEN] int64, unused trailing fields zero."""
    if len(fields) > HEADER_LEN:
        raise ValueError(f"a header holds {HEADER_LEN} fields, got {len(fields)}")
    return torch.tensor(list(fields) + [0] * (HEADER_LEN - len(fields)), dtype=torch.int64, device=device)


def empty_header(device: torch.device) -> torch.Tensor:
    return torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)


class Deadline:
    """One time budget shared by the several waits of one exchange."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    def remaining(self) -> timedelta:
        # gloo treats a zero timeout as "use the group default", so never hand it zero
        return timedelta(seconds=max(self.end - time.monotonic(), 1e-3))


def post_send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup, tag: int, what: str) -> dist.Work:
    try:
        return dist.isend(tensor, dst=dst, group=group, tag=tag)
    except RuntimeError as e:  # gloo raises here at once when the connection is already gone
        raise TransportError(f"{what}: {_first_line(e)}") from e


def post_recv(tensor: torch.Tensor, src: int | None, group: dist.ProcessGroup, tag: int, what: str) -> dist.Work:
    """src None: from any rank of the group (gloo only); the Work's source rank says which."""
    try:
        return dist.irecv(tensor, src=src, group=group, tag=tag)
    except RuntimeError as e:
        raise TransportError(f"{what}: {_first_line(e)}") from e


def wait(work: dist.Work, timeout: timedelta, what: str) -> None:
    """Work.wait with a bound; any failure (timeout, broken connection) becomes a TransportError naming `what`."""
    try:
        work.wait(timeout=timeout)
    except RuntimeError as e:
        raise TransportError(f"{what}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
