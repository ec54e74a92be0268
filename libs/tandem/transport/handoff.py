"""The prefill -> decode KV handoff over the data plane: what the prefill worker sends and the decode worker's
inbox.

Handoff wire protocol (prefill -> decode, on the plane's KV group, `tandem.transport.kv_transfer` framing):
every Prefill that succeeds sends exactly one handoff to the decode rank it was given, under its
kv_transfer_id, as one or two `send_kv` transfers back to back (a per-process lock keeps one handoff's
transfers adjacent):

  1. EXTRAS  uint8 [1, 1, B]: the small state of `PrefilledSequence`, packed by `pack_extras`:
       int64 fields  first_token, status, has_kv, num_mtp, tails dtype code, hidden, rng_len
       int64 [num_mtp]            MTP valid lengths
       bytes num_mtp * hidden     MTP tails (dtype as coded), or none
       bytes rng_len              the sampling generator's state, or none
     status: CONTINUE (decode goes on), or STOP / LENGTH when the first token already finished the request
     (has_kv is 0 then: nothing follows, the decode stream just ends with that reason).
  2. KV      [L, N, C] model dtype: the prompt's cache rows (only when has_kv).

The extras travel on the data plane rather than through the gateway so that the internal protos stay
token ids only and the gateway needs no knowledge of MTP or RNG state.

Ordering: the gateway opens DecodeWorker.Decode first; the decode worker registers the announced
(prefill rank, transfer id) with its `HandoffInbox`, which posts a receive from that prefill rank; then the
gateway calls PrefillWorker.Prefill, whose `send_kv` completes against that posted receive. The inbox has one
thread per prefill rank that receives handoffs in the order that rank sent them and hands each to the call
waiting for its transfer id (a handoff nobody waits for any more, e.g. after a cancelled Decode, is received
and dropped). It posts receives only while some transfer from that rank is announced or left over, so an
idle plane never carries a pending receive for a transfer nobody announced.

Timeouts: the Decode call waits for its handoff at most `kv_timeout_s` and then fails with UNAVAILABLE; the
inbox's own receive waits without a gloo timeout, because a gloo wait that times out closes every KV-group
connection of the process (see DataPlane) and would break the other transfers. A receive still posted after
its caller gave up is harmless: it takes the next handoff from that rank, whatever its id. A prefill worker
that dies fails the receive at once (connection closed), which fails every call waiting on that rank; that
rank's connection then stays unusable (gloo errors stick) until the world is rebuilt. Because gloo cannot
withdraw a posted receive, a worker leaves with `os._exit` after its graceful shutdown (`serve_worker`).
"""

from __future__ import annotations

import enum
import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from tandem.engine.handoff import PrefilledSequence
from tandem.transport.group import DataPlane
from tandem.transport.kv_transfer import recv_kv, send_kv
from tandem.transport.wire import IDLE_WAIT, TransportError, code_dtype, dtype_code

log = logging.getLogger(__name__)


class HandoffStatus(enum.IntEnum):
    CONTINUE = 0  # the decode worker goes on from the KV that follows
    STOP = 1  # the first token ended the request (a stop token): no KV follows
    LENGTH = 2  # max_tokens was 1: no KV follows


@dataclass(slots=True)
class Handoff:
    """What the decode worker receives for one transfer id; `kv` is None unless status is CONTINUE."""

    transfer_id: int
    status: HandoffStatus
    first_token: int
    kv: torch.Tensor | None
    mtp_valid_lens: list[int]
    mtp_tails: torch.Tensor | None
    rng_state: torch.Tensor | None

    def to_prefilled(self, request_id: str, prompt_ids: list[int]) -> PrefilledSequence:
        return PrefilledSequence(request_id, list(prompt_ids), self.first_token, self.kv, self.mtp_valid_lens,
                                 self.mtp_tails, self.rng_state)


_NUM_FIELDS = 7


def pack_extras(status: HandoffStatus, first_token: int, handoff: PrefilledSequence | None) -> torch.Tensor:
    """The handoff's small state as bytes, uint8 [1, 1, B] (layout in the module docstring)."""
    lens = handoff.mtp_valid_lens if handoff is not None else []
    tails = handoff.mtp_tails if handoff is not None and lens else None
    rng = handoff.rng_state if handoff is not None else None
    tail_bytes = tails.detach().cpu().contiguous().view(torch.uint8).flatten() if tails is not None else None
    rng_bytes = rng.detach().cpu().contiguous().view(torch.uint8).flatten() if rng is not None else None
    fields = [first_token, int(status), int(handoff is not None), len(lens),
              dtype_code(tails.dtype) if tails is not None else 0, tails.shape[1] if tails is not None else 0,
              rng_bytes.numel() if rng_bytes is not None else 0, *lens]
    parts = [torch.tensor(fields, dtype=torch.int64).view(torch.uint8)]
    parts += [p for p in (tail_bytes, rng_bytes) if p is not None]
    return torch.cat(parts)[None, None]


def unpack_extras(data: torch.Tensor, transfer_id: int) -> tuple[Handoff, bool]:
    """uint8 [1, 1, B] -> (Handoff without its kv, whether a KV transfer follows)."""
    raw = data.flatten().cpu()
    head = raw[: 8 * _NUM_FIELDS].clone().view(torch.int64).tolist()
    first_token, status, has_kv, num_mtp, tail_code, hidden, rng_len = head
    at = 8 * _NUM_FIELDS
    lens = raw[at: at + 8 * num_mtp].clone().view(torch.int64).tolist()
    at += 8 * num_mtp
    tails = None
    if num_mtp and hidden:
        dtype = code_dtype(tail_code)
        size = num_mtp * hidden * dtype.itemsize
        tails = raw[at: at + size].clone().view(dtype).view(num_mtp, hidden)
        at += size
    rng = raw[at: at + rng_len].clone() if rng_len else None
    if at + rng_len != raw.numel():
        raise TransportError(f"handoff {transfer_id}: extras of {raw.numel()} bytes, expected {at + rng_len}")
    return Handoff(transfer_id, HandoffStatus(status), first_token, None, lens, tails, rng), bool(has_kv)


class HandoffSender:
    """The prefill worker's side: one handoff at a time, so a handoff's two transfers stay adjacent."""

    def __init__(self, plane: DataPlane, timeout_s: float):
        self.plane = plane
        self.timeout_s = timeout_s
        self._lock = threading.Lock()

    def send(self, dst_rank: int, transfer_id: int, status: HandoffStatus, first_token: int,
             handoff: PrefilledSequence | None) -> None:
        """Raises TransportError when the decode rank does not take it within the timeout (or is gone)."""
        extras = pack_extras(status, first_token, handoff).to(self.plane.device)
        with self._lock:
            send_kv(self.plane, dst_rank, transfer_id, extras, self.timeout_s)
            if handoff is not None:
                send_kv(self.plane, dst_rank, transfer_id, handoff.kv.to(self.plane.device), self.timeout_s)


class HandoffInbox:
    """The decode worker's side: `expect` a transfer from a prefill rank -> a Future of its Handoff (see the
    module docstring for the receive threads, and why their waits carry no gloo timeout)."""

    def __init__(self, plane: DataPlane):
        self.plane = plane
        self._cond = threading.Condition()
        self._waiting: dict[int, dict[int, Future]] = {}  # prefill rank -> transfer id -> its caller's Future
        self._left: dict[int, set[int]] = {}  # prefill rank -> ids announced, then given up, still to come
        self._broken: dict[int, BaseException] = {}  # prefill rank -> why its connection is unusable
        self._threads: dict[int, threading.Thread] = {}
        self._closed = threading.Event()

    def expect(self, src_rank: int, transfer_id: int) -> Future:
        future: Future = Future()
        with self._cond:
            if src_rank in self._broken:
                raise TransportError(f"the KV connection to prefill rank {src_rank} failed: "
                                     f"{self._broken[src_rank]}")
            waiting = self._waiting.setdefault(src_rank, {})
            if transfer_id in waiting:
                raise ValueError(f"kv_transfer_id {transfer_id} from rank {src_rank} is already awaited")
            self._left.get(src_rank, set()).discard(transfer_id)
            waiting[transfer_id] = future
            if src_rank not in self._threads:
                self._threads[src_rank] = threading.Thread(target=self._receive_from, args=(src_rank,), daemon=True,
                                                           name=f"kv-inbox-from-rank-{src_rank}")
                self._threads[src_rank].start()
            self._cond.notify_all()
        return future

    def forget(self, src_rank: int, transfer_id: int) -> None:
        """The caller stopped waiting; if the handoff still comes it is received and dropped."""
        with self._cond:
            future = self._waiting.get(src_rank, {}).pop(transfer_id, None)
            if future is not None and not future.done():
                self._left.setdefault(src_rank, set()).add(transfer_id)

    def _receive_from(self, src: int) -> None:
        while True:
            with self._cond:
                while not self._waiting.get(src) and not self._left.get(src) and not self._closed.is_set():
                    self._cond.wait()
            if self._closed.is_set():
                return
            try:
                handoff = self._receive_one(src)
            except Exception as e:  # noqa: BLE001 - fails every caller waiting on this rank, who report it
                if self._closed.is_set():
                    return  # shutting down
                log.error("KV handoffs from prefill rank %d failed: %s", src, e)
                with self._cond:
                    self._broken[src] = e
                    waiting = self._waiting.pop(src, {})
                    self._left.pop(src, None)
                for future in waiting.values():
                    future.set_exception(e)
                return
            with self._cond:
                future = self._waiting.get(src, {}).pop(handoff.transfer_id, None)
                left = self._left.get(src, set())
                if future is None:
                    if handoff.transfer_id in left:
                        left.discard(handoff.transfer_id)
                    else:
                        log.warning("dropped KV transfer %d from rank %d: nobody waits for it", handoff.transfer_id,
                                    src)
            if future is not None:
                future.set_result(handoff)

    def _receive_one(self, src: int) -> Handoff:
        transfer_id, extras = recv_kv(self.plane, src, IDLE_WAIT.total_seconds())
        handoff, has_kv = unpack_extras(extras, transfer_id)
        if has_kv:
            # sent right behind the extras; a timeout here means the sender broke mid-handoff
            kv_id, handoff.kv = recv_kv(self.plane, src, self.plane.timeout_s)
            if kv_id != transfer_id:
                raise TransportError(f"KV transfer {kv_id} from rank {src} followed the extras of {transfer_id}")
        return handoff

    def close(self) -> None:
        """End the idle receive threads (one blocked in a receive stays there: gloo cannot cancel it)."""
        self._closed.set()
        with self._cond:
            self._cond.notify_all()
