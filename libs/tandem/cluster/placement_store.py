"""The controller's versioned expert placement: the static start, published versions, watchers and acks.

Versions count from 1 (the static placement) and increase by one with every `publish`. The store keeps the
newest `history` versions for `get`; `wait_newer` blocks a watcher until a version newer than the one it has
exists. Members acknowledge the version they route with; `all_acked(v, ids)` says whether every one of
`ids` has switched to v or later, after which copies only older versions use may be freed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from tandem.model.config import ModelConfig
from tandem.moe.placement import Placement


class PlacementError(ValueError):
    """A placement, version or ack the store refuses; the message says why."""


class VersionNotFound(PlacementError, KeyError):
    """A version never published, or older than the versions the store keeps."""

    def __str__(self) -> str:
        return str(self.args[0])


def static_phy2log(num_layers: int, num_experts: int, num_servers: int, num_slots_per_server: int) -> torch.Tensor:
    """[L, S * slots] the placement before any load is known, the same for every layer.

    Each logical expert once, in contiguous blocks spread evenly over the servers (block sizes differ by at
    most one; the first `E mod S` servers get the larger ones), at the start of each server's slots. When
    there are more slots than experts, the extra slots hold replicas of experts 0, 1, 2, ... in round-robin
    order, each on a server with a free slot holding the fewest copies of that expert (then the most free
    slots, then the lowest index), so a replica lands on a server without that expert whenever one has room.
    With S * slots == E this is `Placement.identity`.
    """
    if num_experts < 1 or num_servers < 1 or num_layers < 0:
        raise PlacementError(f"need experts and servers, got {num_experts} experts on {num_servers} servers")
    if num_servers * num_slots_per_server < num_experts:
        raise PlacementError(f"{num_servers} expert servers x {num_slots_per_server} slots cannot hold "
                             f"{num_experts} experts")
    base, extra = divmod(num_experts, num_servers)
    servers: list[list[int]] = []
    start = 0
    for i in range(num_servers):
        size = base + (i < extra)
        servers.append(list(range(start, start + size)))
        start += size
    for n in range(num_servers * num_slots_per_server - num_experts):
        expert = n % num_experts
        room = [i for i in range(num_servers) if len(servers[i]) < num_slots_per_server]
        target = min(room, key=lambda i: (servers[i].count(expert), len(servers[i]), i))
        servers[target].append(expert)
    row = torch.tensor([e for server in servers for e in server], dtype=torch.int64)
    return row.repeat(num_layers, 1)


class PlacementStore:
    """Versioned placements of one deployment; thread-safe."""

    def __init__(self, initial: torch.Tensor, num_logical: int, num_slots_per_server: int, history: int = 16):
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.num_logical = num_logical
        self.num_slots_per_server = num_slots_per_server
        self.history = history
        self._cond = threading.Condition()
        self._versions: OrderedDict[int, Placement] = OrderedDict()
        self._acked: dict[str, int] = {}
        self._closed = False
        with self._cond:
            self._add(self._check(initial, shape=None, version=1))

    @property
    def shape(self) -> tuple[int, int]:
        """(L MoE layers, P physical slots)."""
        return tuple(self.current().phy2log.shape)

    def current(self) -> Placement:
        with self._cond:
            return next(reversed(self._versions.values()))

    @property
    def version(self) -> int:
        return self.current().version

    def get(self, version: int) -> Placement:
        """Version `version` (0 = the current one); VersionNotFound if never published or no longer kept."""
        with self._cond:
            if version < 0:
                raise PlacementError(f"version {version} is negative")
            if version == 0:
                return next(reversed(self._versions.values()))
            if version not in self._versions:
                newest = next(reversed(self._versions))
                raise VersionNotFound(f"placement version {version} is not kept (kept: {next(iter(self._versions))}"
                                      f" .. {newest})" if version <= newest else
                                      f"placement version {version} was never published (current {newest})")
            return self._versions[version]

    def publish(self, phy2log: torch.Tensor) -> int:
        """Make `phy2log` [L, P] the current placement; returns its version and wakes every watcher."""
        with self._cond:
            placement = self._check(phy2log, shape=self.shape, version=self.version + 1)
            self._add(placement)
            return placement.version

    def wait_newer(self, known_version: int, timeout: float | None) -> Placement | None:
        """The current placement once its version exceeds `known_version`; None on timeout or `close`."""
        if known_version < 0:
            raise PlacementError(f"known version {known_version} is negative")
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self.version > known_version, timeout)
            return None if self._closed or self.version <= known_version else self.current()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Release every watcher (the controller shuts down)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def ack(self, member_id: str, version: int) -> None:
        """`member_id` routes with `version` now; a member never goes back, so an older ack is ignored."""
        with self._cond:
            if version < 1 or version > self.version:
                raise PlacementError(f"version {version} was never published (current {self.version})")
            self._acked[member_id] = max(version, self._acked.get(member_id, 0))

    def acked_version(self, member_id: str) -> int:
        """The newest version `member_id` acknowledged (0 = none)."""
        with self._cond:
            return self._acked.get(member_id, 0)

    def all_acked(self, version: int, member_ids: set[str] | list[str]) -> bool:
        """Every member of `member_ids` routes with `version` or newer."""
        with self._cond:
            return all(self._acked.get(m, 0) >= version for m in member_ids)

    def forget(self, member_id: str) -> None:
        """Drop a member's acks (it left the cluster)."""
        with self._cond:
            self._acked.pop(member_id, None)

    def _add(self, placement: Placement) -> None:
        self._versions[placement.version] = placement
        while len(self._versions) > self.history:
            self._versions.popitem(last=False)
        self._cond.notify_all()

    def _check(self, phy2log: torch.Tensor, shape: tuple[int, int] | None, version: int) -> Placement:
        phy2log = torch.as_tensor(phy2log).to(device="cpu", dtype=torch.int64)
        if phy2log.dim() != 2:
            raise PlacementError(f"phy2log must be [layers, slots], got shape {tuple(phy2log.shape)}")
        if shape is not None and tuple(phy2log.shape) != shape:
            raise PlacementError(f"phy2log has shape {tuple(phy2log.shape)}, the deployment's is {shape}")
        if phy2log.shape[1] % max(self.num_slots_per_server, 1):
            raise PlacementError(f"{phy2log.shape[1]} slots is not a multiple of {self.num_slots_per_server} "
                                 "slots per server")
        if phy2log.numel() and not ((phy2log >= 0) & (phy2log < self.num_logical)).all():
            raise PlacementError(f"phy2log holds expert ids outside [0, {self.num_logical})")
        try:
            return Placement(phy2log, self.num_logical, version)
        except ValueError as e:
            raise PlacementError(str(e)) from None


def num_placement_layers(model: ModelConfig) -> int:
    """Rows of the placement: every MoE layer in layer order, the MTP modules' MoE layers included (they
    draft through the same expert servers), so row i is the i-th layer with routed experts."""
    return sum(model.is_moe_layer(i) for i in range(model.num_hidden_layers + model.num_nextn_predict_layers))
