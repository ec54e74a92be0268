"""KV-cache handoff from a prefill worker to a decode worker, on the plane's KV group.

Wire protocol, sender -> receiver, two messages:
  KV_HEADER  int64 [8]: transfer_id, L num_kv_layers, N num_tokens, C kv_dim, dtype code
  KV_DATA    [L, N, C]  the sequence's cache rows, contiguous, in position order

A receiver either names the sender or takes the next transfer from any rank (gloo only; it fails when any
peer's connection resets, so name the sender where the control plane knows it); transfers from one sender
arrive in the order they were sent. A receive that times out closes this process's KV-group
connections (gloo), so a decode worker should post `recv_kv` only for a transfer the control plane has
announced, and treat a TransportError as the end of that plane.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tandem.transport.group import DataPlane
from tandem.transport.wire import (Deadline, Tag, code_dtype, dtype_code, empty_header, make_header, post_recv,
                                   post_send, wait)


def send_kv(plane: DataPlane, dst_rank: int, transfer_id: int, kv: torch.Tensor, timeout_s: float) -> None:
    """Send kv [num_kv_layers, num_tokens, kv_dim]; returns once the receiver has it all, or raises TransportError."""
    if kv.dim() != 3:
        raise ValueError(f"KV to send must be [num_kv_layers, num_tokens, kv_dim], got {tuple(kv.shape)}")
    deadline = Deadline(timeout_s)
    kv = kv.contiguous()
    header = make_header(transfer_id, *kv.shape, dtype_code(kv.dtype), device=plane.device)
    what = f"sending KV transfer {transfer_id} to rank {dst_rank}"
    sends = [post_send(header, dst_rank, plane.kv_group, Tag.KV_HEADER, what),
             post_send(kv, dst_rank, plane.kv_group, Tag.KV_DATA, what)]
    for work in sends:
        wait(work, deadline.remaining(), what)


def recv_kv(plane: DataPlane, src_rank: int | None, timeout_s: float) -> tuple[int, torch.Tensor]:
    """Receive the next transfer from src_rank (None: from any rank) -> (transfer_id, kv [L, N, C])."""
    deadline = Deadline(timeout_s)
    header = empty_header(plane.device)
    source = "any rank" if src_rank is None else f"rank {src_rank}"
    work = post_recv(header, src_rank, plane.kv_group, Tag.KV_HEADER, f"receiving KV from {source}")
    wait(work, deadline.remaining(), f"waiting for KV from {source}")
    if src_rank is None:
        src_rank = dist.get_global_rank(plane.kv_group, work._source_rank())
    transfer_id, num_layers, num_tokens, kv_dim, code = header[:5].tolist()
    kv = torch.empty(num_layers, num_tokens, kv_dim, dtype=code_dtype(code), device=plane.device)
    what = f"receiving KV transfer {transfer_id} from rank {src_rank}"
    wait(post_recv(kv, src_rank, plane.kv_group, Tag.KV_DATA, what), deadline.remaining(), what)
    return transfer_id, kv
