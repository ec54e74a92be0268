"""Joining the data plane: one torch.distributed world of fixed shape, with one process group per kind of traffic.

Rank layout: attention workers first (prefill and decode alike, ranks 0 .. A-1), then the expert servers
(ranks A .. A+S-1); `Roles` turns an index into a rank. The shape is fixed at start-up, like DeepSeek's
EP32/EP320 deployments: every rank must join before any traffic flows, and a rank that leaves breaks the world
(see `DataPlane`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class Roles:
    """Who is who in the data plane's world: attention workers first, then expert servers."""

    num_attention: int
    num_expert_servers: int

    def __post_init__(self) -> None:
        if self.num_attention < 1 or self.num_expert_servers < 0:
            raise ValueError(f"need at least one attention worker and no negative counts, got {self}")

    @property
    def world_size(self) -> int:
        return self.num_attention + self.num_expert_servers

    def attention_rank(self, i: int) -> int:
        if not 0 <= i < self.num_attention:
            raise IndexError(f"attention worker {i} of {self.num_attention}")
        return i

    def expert_rank(self, server_idx: int) -> int:
        if not 0 <= server_idx < self.num_expert_servers:
            raise IndexError(f"expert server {server_idx} of {self.num_expert_servers}")
        return self.num_attention + server_idx

    def is_expert_server(self, rank: int) -> bool:
        return rank >= self.num_attention


class DataPlane:
    """This process's membership of the data plane: the world plus separate groups for expert and KV traffic.

    Expert activations and KV handoffs travel on different process groups, i.e. different connections, so
    a large KV transfer never queues behind (or interleaves with) a layer's expert exchange. Tensors live on
    `device` (CPU with gloo, the process's GPU with NCCL); the code paths are the same.

    Failure semantics (gloo): a peer that dies makes operations with that peer fail at once ("connection
    closed"); receives from other named peers are unaffected, but a pending any-source receive may fail too
    (when the connection resets rather than closes). A wait that times out, however, makes gloo close every connection
    of that group in this process, so after a timeout the group is unusable and the worker must rejoin a new
    plane. torch.distributed keeps one default world per process, so there is one DataPlane per process.
    """

    def __init__(self, rank: int, world_size: int, backend: str, device: torch.device, timeout_s: float,
                 expert_group: dist.ProcessGroup, kv_group: dist.ProcessGroup, roles: Roles | None,
                 store: dist.Store):
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.device = device
        self.timeout_s = timeout_s
        self.expert_group = expert_group
        self.kv_group = kv_group
        self.roles = roles
        # posts on one group from two threads could interleave two messages' parts; one poster at a time
        self.expert_lock = threading.Lock()
        # the rendezvous store; also usable for out-of-band coordination (keys outside torch's own)
        self.store = store

    @classmethod
    def join(cls, store_host: str, store_port: int, rank: int, world_size: int, backend: str = "gloo",
             timeout_s: float = 30.0, is_store_server: bool = False, roles: Roles | None = None,
             device: torch.device | str | None = None) -> "DataPlane":
        """Rendezvous at the TCPStore `store_host:store_port` and build the groups; blocks until all ranks join.

        The store server is whichever process passes is_store_server=True (a rank, or the controller, which
        hosts it with `torch.distributed.TCPStore(..., is_master=True)` without being a rank).
        """
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        if roles is not None and roles.world_size != world_size:
            raise ValueError(f"{roles} describe {roles.world_size} ranks, world_size is {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(store_host, store_port, world_size, is_master=is_store_server, timeout=timeout,
                              wait_for_workers=False)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        ranks = list(range(world_size))
        expert_group = dist.new_group(ranks, timeout=timeout, backend=backend)
        kv_group = dist.new_group(ranks, timeout=timeout, backend=backend)
        return cls(rank, world_size, backend, device, timeout_s, expert_group, kv_group, roles, store)

    def close(self) -> None:
        """Leave the plane: destroys both groups and the default world. Safe to call twice."""
        if not dist.is_initialized():
            return
        for group in (self.expert_group, self.kv_group):
            dist.destroy_process_group(group)
        dist.destroy_process_group()
