"""Expert placement planning: how many copies each logical expert gets and which expert server holds each
copy, so that the most loaded server is as close to the mean as possible -- and, given the placement that
is serving now, with as few experts moved as that takes.

Pure and deterministic: arrays in, arrays out, the same inputs give the same plan. No I/O.

Terms, as in `tandem.moe.placement`: a logical expert is expert j of a MoE layer, a physical expert one
loaded copy of it. Slot p lives on expert server p // slots_per_server; servers are spread evenly over
nodes (server s on node s // servers_per_node). Tokens of a replicated expert are split evenly over its
copies, so a server's load is the sum over its slots of load[expert] / copies[expert], and a layer's
balancedness is mean server load / max server load (1.0 is perfect).

Policies (per layer):
- global: copies by repeatedly giving one more to the expert with the highest load per copy; copies packed
  heaviest first, each onto the least loaded server with a free slot (avoiding a second copy of an expert
  on one server); then `_repair` without margin until no single move lowers the most loaded server.
- hierarchical: expert groups packed onto nodes (equal groups per node, node loads balanced), then the
  global steps inside each node with that node's slots, so every copy of an expert stays on its group's
  node. Needs groups % nodes == 0.
- auto: hierarchical when it applies, global otherwise.

Migration-aware re-planning (whenever a previous placement is given, on top of either policy): start from
the previous placement and let `_repair` change it one move at a time. A move changes one slot's expert
(one more copy of an expert of the worst server, paid by a copy of an expert that has several) or swaps the
experts of two slots; it is taken only if it lowers the worst server's load by more than `margin` (a
fraction of that load) for each expert it moves (one that moves none, as a swap of two experts that both
moved this re-plan, only has to lower it), while no server it adds load to reaches that lowered level. Among such moves the one that moves fewest experts wins (moving an expert back to where it was is
free), then the one leaving the lowest peak. Repair stops once the layer is as balanced as the plan from
scratch (moving on would buy balance a full re-plan does not). Where single moves get stuck short of that,
two larger steps are weighed, each taken only if it lowers the worst server by more than the margin for each
expert it moves: under hierarchical, by more than `REGROUP_GAIN` too, regrouping the nodes as the plan from
scratch does, then repairing (from two starts: the copies the loads ask for, or only the experts of the groups
that change node moved, one copy each, which moves fewest; the one with more moves must pay for them); and,
by more than `REPLAN_GAIN` too, the plan from scratch for the worst node (or the whole layer under global),
its servers renamed to keep most experts in place. Every step thus pays per expert moved: with a
margin m, a layer whose plan moved n experts has its worst server below (1 - m)^n times where it was.
Re-planning on the loads a plan was made for moves nothing. (A previous placement that breaks the
hierarchical rule, copies of a group on several nodes, is first made to keep it, whatever the margin.)

Moves are counted as in the online switch: a server that gains a copy of an expert it did not hold loads
that expert's weights (one move); reordering a server's slots is free.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tandem.moe.placement import Placement

POLICIES = ("auto", "global", "hierarchical")
DEFAULT_MARGIN = 0.0
REPLAN_GAIN = 0.01  # a domain planned from scratch replaces the repaired one if it lowers the worst server this much
REGROUP_GAIN = 0.002  # and a regrouping of the nodes (whole groups of experts moved), even with no margin
_REL_EPS = 1e-9  # float noise: a load change smaller than this fraction of the worst load is no change


@dataclass(frozen=True, slots=True)
class ClusterShape:
    """The expert-parallel deployment one plan is for."""

    num_servers: int
    slots_per_server: int
    num_nodes: int = 1
    num_groups: int = 1  # expert groups of the router (n_group); 1 = ungrouped

    def __post_init__(self) -> None:
        for name in ("num_servers", "slots_per_server", "num_nodes", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_servers % self.num_nodes:
            raise ValueError(f"{self.num_servers} servers cannot be spread evenly over {self.num_nodes} nodes "
                             "(servers must be a multiple of nodes)")

    @property
    def num_physical(self) -> int:
        return self.num_servers * self.slots_per_server

    @property
    def servers_per_node(self) -> int:
        return self.num_servers // self.num_nodes

    def resolve_policy(self, policy: str, num_experts: int) -> str:
        """Check this shape can hold `num_experts` logical experts under `policy`; return global or
        hierarchical (what auto picks)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if self.num_physical < num_experts:
            raise ValueError(f"{self.num_physical} physical slots ({self.num_servers} servers x "
                             f"{self.slots_per_server}) are fewer than the {num_experts} logical experts: "
                             "every expert needs a slot")
        if num_experts % self.num_groups:
            raise ValueError(f"{self.num_groups} expert groups do not divide {num_experts} experts")
        hierarchical_ok = self.num_groups % self.num_nodes == 0
        if policy == "hierarchical" and not hierarchical_ok:
            raise ValueError(f"the hierarchical policy needs the expert groups ({self.num_groups}) to be a "
                             f"multiple of the nodes ({self.num_nodes}); use --policy global or auto")
        if policy == "auto":
            return "hierarchical" if hierarchical_ok else "global"
        return policy


@dataclass(slots=True)
class Plan:
    """A placement for every MoE layer with its quality. Arrays are numpy; `to_placement` gives torch."""

    phy2log: np.ndarray  # [L, P] int64, logical expert in each physical slot
    num_logical: int
    slots_per_server: int
    policy: str  # global or hierarchical (what was run)
    server_load: np.ndarray  # [L, S] float64, under the loads it was planned for
    moved: np.ndarray  # [L] int64, experts a server gained since the previous placement (0 without one)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def logcnt(self) -> np.ndarray:
        """[L, E] copies of each logical expert."""
        return np.stack([np.bincount(row, minlength=self.num_logical) for row in self.phy2log])

    @property
    def log2phy(self) -> np.ndarray:
        """[L, E, R] slots of each logical expert in slot order, padded with -1 (R = most copies)."""
        return log2phy_table(self.phy2log, self.num_logical)

    @property
    def balancedness(self) -> np.ndarray:
        """[L] mean server load / max server load (1.0 when a layer has no load)."""
        return _balancedness(self.server_load)

    def to_placement(self, version: int = 0) -> Placement:
        return Placement(torch.from_numpy(self.phy2log.copy()), self.num_logical, version)

    def to_json(self) -> dict:
        """The form `tandem eplb plan --json` writes (and --previous reads back)."""
        return {"phy2log": self.phy2log.tolist(), "logcnt": self.logcnt.tolist(),
                "balancedness": [round(float(b), 6) for b in self.balancedness], "moved": self.moved.tolist()}


def plan_placement(load, shape: ClusterShape, policy: str = "auto", previous=None,
                   margin: float = DEFAULT_MARGIN) -> Plan:
    """Plan every layer's placement.

    load: [L, E] tokens per logical expert (array, tensor or nested lists; finite, >= 0).
    previous: [L, P] phy2log now serving (array, tensor, nested lists or a Placement), or None.
    margin: with `previous`, the fraction of the worst server's load a change must save, for each expert it
        moves, to be made (>= 0).
    Raises ValueError naming the problem on any invalid input.
    """
    # L layers, E logical experts, P physical slots, S servers, k slots per server
    weights = as_load(load)
    num_layers, num_experts = weights.shape
    resolved = shape.resolve_policy(policy, num_experts)
    if isinstance(margin, bool) or not isinstance(margin, (int, float, np.number)) or not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    prev = None if previous is None else as_previous(previous, num_layers, num_experts, shape.num_physical)
    planner = _LayerPlanner(shape, num_experts, resolved == "hierarchical", float(margin))
    rows = [planner.plan(weights[i], None if prev is None else prev[i]) for i in range(num_layers)]
    phy2log = np.stack(rows)
    moved = np.zeros(num_layers, np.int64) if prev is None else count_moves(prev, phy2log, shape.slots_per_server)
    return Plan(phy2log, num_experts, shape.slots_per_server, resolved,
                server_loads(weights, phy2log, shape.slots_per_server), moved)


# --- measures --------------------------------------------------------------------------------------------

def server_loads(load, phy2log, slots_per_server: int) -> np.ndarray:
    """[L, S] each server's load: sum over its slots of load[expert] / copies[expert]."""
    weights = as_load(load)
    phy = np.asarray(phy2log, dtype=np.int64)
    num_layers, num_physical = phy.shape
    if num_physical % slots_per_server:
        raise ValueError(f"{num_physical} slots are not a whole number of servers of {slots_per_server}")
    out = np.empty((num_layers, num_physical // slots_per_server))
    for i in range(num_layers):
        out[i] = _server_load(weights[i], phy[i], slots_per_server)
    return out


def balancedness(load, phy2log, slots_per_server: int) -> np.ndarray:
    """[L] mean server load / max server load of `phy2log` under `load` (1.0 for a layer with no load)."""
    return _balancedness(server_loads(load, phy2log, slots_per_server))


def count_moves(previous, phy2log, slots_per_server: int) -> np.ndarray:
    """[L] how many (server, logical expert) pairs `phy2log` has that `previous` had not: each is one
    expert's weights loaded onto a server."""
    old, new = np.asarray(previous, dtype=np.int64), np.asarray(phy2log, dtype=np.int64)
    if old.shape != new.shape:
        raise ValueError(f"placements of shapes {old.shape} and {new.shape} cannot be compared")
    num_layers, num_physical = new.shape
    num_servers = num_physical // slots_per_server
    experts = int(max(old.max(), new.max())) + 1
    server = np.arange(num_physical) // slots_per_server
    moved = np.empty(num_layers, np.int64)
    for i in range(num_layers):
        had = np.zeros((num_servers, experts), bool)
        has = np.zeros((num_servers, experts), bool)
        had[server, old[i]] = True
        has[server, new[i]] = True
        moved[i] = int((has & ~had).sum())
    return moved


def log2phy_table(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
    """[L, E, R] slots of each logical expert in slot order, padded with -1."""
    phy = np.asarray(phy2log, dtype=np.int64)
    num_layers = phy.shape[0]
    counts = np.stack([np.bincount(row, minlength=num_logical) for row in phy])
    out = np.full((num_layers, num_logical, int(counts.max())), -1, dtype=np.int64)
    for i in range(num_layers):
        order = np.argsort(phy[i], kind="stable")  # slots grouped by expert, in slot order
        rank = np.arange(len(order)) - np.repeat(np.cumsum(counts[i]) - counts[i], counts[i])
        out[i, phy[i, order], rank] = order
    return out


def _server_load(w: np.ndarray, phy: np.ndarray, k: int) -> np.ndarray:
    counts = np.bincount(phy, minlength=w.shape[0])
    return np.bincount(np.arange(phy.shape[0]) // k, weights=w[phy] / counts[phy])


def _balancedness(server_load: np.ndarray) -> np.ndarray:
    top = server_load.max(axis=-1)
    mean = server_load.mean(axis=-1)
    return np.where(top > 0, mean / np.where(top > 0, top, 1.0), 1.0)


# --- input checks ----------------------------------------------------------------------------------------

def _to_array(value, what: str, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False) if value.dtype != object else _to_array(value.tolist(), what, dtype)
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise ValueError(f"{what} must be a list of layers, each a list of numbers; got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} has no layers")
    rows = list(value)
    for i, row in enumerate(rows):
        if not isinstance(row, Sequence) or isinstance(row, (str, bytes)):
            raise ValueError(f"{what}: layer {i} is not a list of numbers")
        if len(row) != len(rows[0]):
            raise ValueError(f"{what} has ragged layers: layer {i} has {len(row)} entries, layer 0 has "
                             f"{len(rows[0])}")
    try:
        return np.array(rows, dtype=dtype)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold numbers only") from None


def as_load(load) -> np.ndarray:
    """`load` as a checked [L, E] float64 array: at least one layer and expert, every entry finite, >= 0."""
    weights = _to_array(load, "load", np.float64)
    if weights.ndim != 2 or weights.shape[0] == 0 or weights.shape[1] == 0:
        raise ValueError(f"load must be [layers, experts] with at least one of each, got shape {weights.shape}")
    bad = ~np.isfinite(weights)
    if bad.any():
        layer, expert = np.argwhere(bad)[0]
        raise ValueError(f"load of layer {layer}, expert {expert} is {weights[layer, expert]}: loads must be finite")
    if (weights < 0).any():
        layer, expert = np.argwhere(weights < 0)[0]
        raise ValueError(f"load of layer {layer}, expert {expert} is {weights[layer, expert]}: loads must be >= 0")
    return weights


def as_previous(previous, num_layers: int, num_experts: int, num_physical: int) -> np.ndarray:
    """`previous` as a checked [L, P] int64 phy2log in which every logical expert has a slot."""
    if isinstance(previous, Placement):
        previous = previous.phy2log
    raw = _to_array(previous, "previous placement", np.float64)
    if raw.shape != (num_layers, num_physical):
        raise ValueError(f"previous placement has shape {list(raw.shape)}; expected [{num_layers} layers, "
                         f"{num_physical} slots]")
    if not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
        raise ValueError("previous placement must hold integer expert ids")
    phy = raw.astype(np.int64)
    outside = (phy < 0) | (phy >= num_experts)
    if outside.any():
        layer, slot = np.argwhere(outside)[0]
        raise ValueError(f"previous placement: layer {layer}, slot {slot} holds expert {phy[layer, slot]}, "
                         f"outside 0..{num_experts - 1}")
    for i in range(num_layers):
        missing = np.flatnonzero(np.bincount(phy[i], minlength=num_experts) == 0)
        if missing.size:
            raise ValueError(f"previous placement: layer {i} has no copy of expert {missing[0]}")
    return phy


# --- one layer -------------------------------------------------------------------------------------------

class _LayerPlanner:
    """Plans one layer at a time for a fixed shape and policy. Domains: under global one domain holds every
    server and expert; under hierarchical each node is a domain holding its servers and its groups' experts
    (which node holds a group is decided per layer)."""

    def __init__(self, shape: ClusterShape, num_experts: int, hierarchical: bool, margin: float):
        self.k = shape.slots_per_server
        self.num_servers = shape.num_servers
        self.num_experts = num_experts
        self.hierarchical = hierarchical
        self.margin = margin
        self.num_domains = shape.num_nodes if hierarchical else 1
        self.servers_per_domain = shape.num_servers // self.num_domains
        self.server_domain = np.arange(shape.num_servers) // self.servers_per_domain
        self.slot_server = np.arange(shape.num_physical) // self.k
        self.group_size = num_experts // shape.num_groups
        self.num_groups = shape.num_groups

    # ..... policies

    def plan(self, w: np.ndarray, prev: np.ndarray | None) -> np.ndarray:
        fresh_map = self._pack_groups(w) if self.hierarchical else None
        if prev is None:
            return self._fresh(w, fresh_map)
        # migration-aware. The plan from scratch sets the target: moving further would buy balance that
        # re-planning does not, with weights copied while serving.
        prev_holds = self._holds(prev) > 0
        prev_map = self._infer_group_map(prev) if self.hierarchical else None
        new_map = self._relabel_map(fresh_map, prev_map) if self.hierarchical else None
        fresh = self._fresh(w, new_map)
        target = _server_load(w, fresh, self.k).max() * (1 + _REL_EPS)  # equal up to summation order counts as met
        best = self._repair(w, self._sticky(w, prev, prev_map), prev_map, prev_holds, target)
        if self._top(w, best) <= target:
            return best
        if self.hierarchical and not np.array_equal(new_map, prev_map):  # regroup where the groups moved
            # from two starts: copies as the loads ask, or only the groups' experts moved (fewest moves). A
            # regrouping must pay REGROUP_GAIN too; the one with more moves must pay for them against the other
            starts = (self._sticky(w, prev, new_map, lean=True), self._sticky(w, prev, new_map))
            regrouped = [self._repair(w, start, new_map, prev_holds, target) for start in starts]
            regrouped.sort(key=lambda phy: int(count_moves(prev[None], phy[None], self.k)[0]))
            same_groups = best
            for candidate in regrouped:
                if self._pays(w, best, candidate, prev, REGROUP_GAIN if best is same_groups else self.margin):
                    best = candidate
        # single moves can get stuck (a hot expert's copies on every server of a node, say): take the plan
        # from scratch for the worst domain, its servers renamed to keep what they hold, if that pays
        for _ in range(self.num_domains):
            top = self._top(w, best)
            if top <= target:
                break
            domain = self.server_domain[int(np.argmax(_server_load(w, best, self.k)))]
            slots = self._domain_slots(domain)
            if not np.array_equal(np.unique(best[slots]), np.unique(fresh[slots])):
                break  # its groups differ: the regrouping above was the chance for that
            spliced = best.copy()
            spliced[slots] = self._keep_in_place(fresh[slots], prev[slots])
            if not self._pays(w, best, spliced, prev, REPLAN_GAIN):
                break
            best = spliced
        return best

    def _pays(self, w: np.ndarray, current: np.ndarray, step: np.ndarray, prev: np.ndarray, floor: float) -> bool:
        """Whether `step` (a placement several moves from `current`) lowers the worst server by more than the
        margin for each expert it moves beyond `current`'s moves, as single moves must, and by more than
        `floor` in any case."""
        top = self._top(w, current)
        extra = int(count_moves(prev[None], step[None], self.k)[0] - count_moves(prev[None], current[None], self.k)[0])
        need = max(floor, self.margin * max(extra, 1))
        return self._top(w, step) < top * (1 - need) - _REL_EPS * top

    def _top(self, w: np.ndarray, phy: np.ndarray) -> float:
        return float(_server_load(w, phy, self.k).max())

    def _domain_slots(self, domain: int) -> np.ndarray:
        per_domain = self.servers_per_domain * self.k
        return np.arange(domain * per_domain, (domain + 1) * per_domain)

    def _keep_in_place(self, phy: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """`phy` (slots of whole servers) with its servers renamed so that as many (server, expert) pairs as
        possible are already in `prev`, and each server's experts in the slots where `prev` had them."""
        k = self.k
        new, old = phy.reshape(-1, k), prev.reshape(-1, k)
        num = new.shape[0]
        holds_new = np.zeros((num, self.num_experts), np.int64)
        holds_old = np.zeros((num, self.num_experts), np.int64)
        np.add.at(holds_new, (np.repeat(np.arange(num), k), new.ravel()), 1)
        np.add.at(holds_old, (np.repeat(np.arange(num), k), old.ravel()), 1)
        shared = (holds_new > 0).astype(np.float32) @ (holds_old > 0).astype(np.float32).T  # experts in common
        rename = _match(np.rint(shared).astype(np.int64), 1)
        out = np.empty_like(new)
        for server, target in enumerate(rename):
            out[target] = _align(new[server], old[target])
        return out.ravel()

    def _fresh(self, w: np.ndarray, group_map: np.ndarray | None) -> np.ndarray:
        """The plan from scratch (see the module docstring), or, when it is better, the plan without redundant
        experts with each server's spare slots holding second copies of its own experts (the same server
        loads), repaired: so redundancy never makes a layer worse than none."""
        expert_domain = self._expert_domain(group_map)
        counts = self._replicate(w, expert_domain)
        phy = self._fill(w, counts, np.full(self.slot_server.shape[0], -1, np.int64), expert_domain)
        phy = self._repair_domains(w, phy, group_map)
        spare = self.k - self.num_experts // self.num_servers
        if self.num_experts % self.num_servers or spare == 0:
            return phy
        domain_load = np.bincount(expert_domain, weights=w, minlength=self.num_domains)
        if self._top(w, phy) <= max(w.max(), domain_load.max() / self.servers_per_domain):
            return phy  # no plan without redundancy can do better: its bound
        shape = ClusterShape(self.num_servers, self.k - spare, self.num_domains, self.num_groups)
        single = _LayerPlanner(shape, self.num_experts, self.hierarchical, 0.0)._fresh(w, group_map)
        single = single.reshape(self.num_servers, -1)
        padded = np.concatenate([single, np.repeat(single[:, :1], spare, axis=1)], axis=1).ravel()
        padded = self._repair_domains(w, padded, group_map)
        return padded if self._top(w, padded) < self._top(w, phy) else phy

    def _repair_domains(self, w: np.ndarray, phy: np.ndarray, group_map: np.ndarray | None) -> np.ndarray:
        for domain in range(self.num_domains):  # every node balanced, not only the worst one's
            phy = self._repair(w, phy, group_map, None, domain=domain)
        return phy

    # ..... domains

    def _expert_domain(self, group_map: np.ndarray | None) -> np.ndarray:
        if group_map is None:
            return np.zeros(self.num_experts, np.int64)
        return group_map[np.arange(self.num_experts) // self.group_size]

    def _pack_groups(self, w: np.ndarray) -> np.ndarray:
        """[G] node of each expert group: equal groups per node, heaviest group first onto the lightest node
        with room, then swaps of two groups while they lower the heaviest node."""
        # G groups, N nodes
        group_load = w.reshape(self.num_groups, self.group_size).sum(1)
        per_node = self.num_groups // self.num_domains
        node_of = np.empty(self.num_groups, np.int64)
        node_load = np.zeros(self.num_domains)
        room = np.full(self.num_domains, per_node)
        for g in np.argsort(-group_load, kind="stable"):
            n = int(np.argmin(np.where(room > 0, node_load, np.inf)))
            node_of[g], room[n] = n, room[n] - 1
            node_load[n] += group_load[g]
        for _ in range(4 * self.num_groups if self.num_domains > 1 else 0):
            heavy = int(np.argmax(node_load))
            top = node_load[heavy]
            here, there = np.flatnonzero(node_of == heavy), np.flatnonzero(node_of != heavy)
            delta = group_load[here][:, None] - group_load[there][None, :]  # load moved from heavy
            peak = np.maximum(top - delta, node_load[node_of[there]][None, :] + delta)
            peak = np.where(delta > _REL_EPS * top, peak, np.inf)
            i, j = np.unravel_index(int(np.argmin(peak)), peak.shape)
            if not peak[i, j] < top - _REL_EPS * top:
                break
            g, h = here[i], there[j]
            node_load[heavy] -= delta[i, j]
            node_load[node_of[h]] += delta[i, j]
            node_of[g], node_of[h] = node_of[h], heavy
        return node_of

    def _infer_group_map(self, phy: np.ndarray) -> np.ndarray:
        """[G] node of each group in a placement: where most of its copies are (equal groups per node)."""
        node = self.server_domain[self.slot_server]
        overlap = np.zeros((self.num_groups, self.num_domains), np.int64)
        np.add.at(overlap, (phy // self.group_size, node), 1)
        return _match(overlap, self.num_groups // self.num_domains)

    def _relabel_map(self, group_map: np.ndarray, prev_map: np.ndarray) -> np.ndarray:
        """`group_map` with its nodes renamed so that as many groups as possible keep their node."""
        overlap = np.zeros((self.num_domains, self.num_domains), np.int64)
        np.add.at(overlap, (group_map, prev_map), 1)
        rename = _match(overlap, 1)
        return rename[group_map]

    # ..... building a placement

    def _replicate(self, w: np.ndarray, expert_domain: np.ndarray,
                   start: np.ndarray | None = None) -> np.ndarray:
        """[E] copies per expert: within each domain, one more copy at a time to the expert with the highest
        load per copy (lowest id on ties). With `start` [E] (copies already in place), each domain starts from
        those (at least one each) instead: copies beyond its slots are taken from the experts whose load per
        copy stays lowest without them, and free slots filled as above, so that as many copies as possible
        stay where they are."""
        counts = np.ones(self.num_experts, np.int64) if start is None else np.maximum(start, 1)
        slots = self.servers_per_domain * self.k
        for domain in range(self.num_domains):
            experts = np.flatnonzero(expert_domain == domain)
            load = dict(zip(experts.tolist(), w[experts].tolist()))
            surplus = int(counts[experts].sum()) - slots
            if surplus > 0:
                trim = [(load[e] / (int(counts[e]) - 1), e) for e in experts.tolist() if counts[e] > 1]
                heapq.heapify(trim)
                for _ in range(surplus):
                    _, e = heapq.heappop(trim)
                    counts[e] -= 1
                    if counts[e] > 1:
                        heapq.heappush(trim, (load[e] / (int(counts[e]) - 1), e))
            heap = [(-load[e] / int(counts[e]), e) for e in experts.tolist()]
            heapq.heapify(heap)
            for _ in range(slots - int(counts[experts].sum())):
                _, e = heapq.heappop(heap)
                counts[e] += 1
                heapq.heappush(heap, (-load[e] / int(counts[e]), e))
        return counts

    def _fill(self, w: np.ndarray, counts: np.ndarray, phy: np.ndarray, expert_domain: np.ndarray) -> np.ndarray:
        """Fill the free slots (-1) of `phy` with the copies `counts` asks for beyond those present: heaviest
        copy first, each onto the least loaded server of its domain with a free slot, preferring one without
        a copy of that expert (lowest server on ties)."""
        phy = phy.copy()
        per_copy = w / counts
        taken = phy >= 0
        need = counts - np.bincount(phy[taken], minlength=self.num_experts)
        load = np.bincount(self.slot_server[taken], weights=per_copy[phy[taken]], minlength=self.num_servers)
        holds = self._holds(phy) > 0
        free_slots = [list(np.flatnonzero(~taken[s * self.k:(s + 1) * self.k]) + s * self.k)
                      for s in range(self.num_servers)]
        free = np.array([len(f) for f in free_slots])
        order = np.argsort(-per_copy, kind="stable")
        for e in np.repeat(order, need[order]):
            ok = (self.server_domain == expert_domain[e]) & (free > 0)
            fresh = ok & ~holds[:, e]
            s = int(np.argmin(np.where(fresh if fresh.any() else ok, load, np.inf)))
            phy[free_slots[s].pop(0)] = e
            free[s] -= 1
            load[s] += per_copy[e]
            holds[s, e] = True
        return phy

    def _sticky(self, w: np.ndarray, prev: np.ndarray, group_map: np.ndarray | None,
                lean: bool = False) -> np.ndarray:
        """The previous placement made valid for `group_map`: copies outside their expert's node are
        dropped, and the counts start from the copies left (see `_replicate`; surplus copies leave the most
        loaded servers first); the freed slots are filled as in `_fill`. `lean`: the experts that lost their
        copies get one each and nothing more; slots still free hold a second copy of one of their server's
        own experts (which moves nothing), for `_repair` to put to use where that pays."""
        expert_domain = self._expert_domain(group_map)
        inside = self.server_domain[self.slot_server] == expert_domain[prev]
        if inside.all():
            return prev.copy()
        left = np.bincount(prev[inside], minlength=self.num_experts)
        if lean:
            phy = self._fill(w, np.maximum(left, 1), np.where(inside, prev, -1), expert_domain)
            return self._double_up(w, phy, expert_domain)
        counts = self._replicate(w, expert_domain, start=left)
        phy = np.where(inside, prev, -1)
        load = _server_load_partial(w, counts, phy, self.k, self.num_servers)
        present = np.bincount(phy[phy >= 0], minlength=self.num_experts)
        for e in np.flatnonzero(present > counts):
            slots = np.flatnonzero(phy == e)
            heaviest = slots[np.lexsort((-slots, -load[self.slot_server[slots]]))]
            phy[heaviest[:present[e] - counts[e]]] = -1
        return self._fill(w, counts, phy, expert_domain)

    def _double_up(self, w: np.ndarray, phy: np.ndarray, expert_domain: np.ndarray) -> np.ndarray:
        """Each free slot (-1) takes another copy of an expert its server holds: one held nowhere else if
        there is one (no load changes), else the one that adds least to the server's load (any expert of
        its domain, for a server left empty)."""
        phy = phy.copy()
        for slot in np.flatnonzero(phy < 0):
            server = self.slot_server[slot]
            own = (self.slot_server == server) & (phy >= 0)
            candidates = np.unique(phy[own])
            if candidates.size == 0:
                candidates = np.flatnonzero(expert_domain == self.server_domain[server])
            counts = np.bincount(phy[phy >= 0], minlength=self.num_experts)[candidates]
            here = np.bincount(phy[own], minlength=self.num_experts)[candidates]
            # the server's share of expert e goes from here/count to (here + 1)/(count + 1)
            added = w[candidates] * ((here + 1) / (counts + 1) - here / np.maximum(counts, 1))
            phy[slot] = candidates[np.lexsort((candidates, added))[0]]
        return phy

    def _holds(self, phy: np.ndarray) -> np.ndarray:
        """[S, E] copies of each expert on each server."""
        holds = np.zeros((self.num_servers, self.num_experts), np.int64)
        np.add.at(holds, (self.slot_server, phy), 1)
        return holds

    # ..... repair: single moves that lower the worst server

    def _repair(self, w: np.ndarray, phy: np.ndarray, group_map: np.ndarray | None,
                prev_holds: np.ndarray | None, target: float = 0.0, domain: int | None = None) -> np.ndarray:
        """Improve `phy` one move at a time while a move lowers the worst server (of `domain`, or overall)
        by more than the margin (no margin without `prev_holds`: a fresh plan), until it is <= `target`.
        At most one move per slot. See the module docstring."""
        # E experts, P slots, S servers, k slots per server, R candidate moves, D servers in the domain
        k, num_experts = self.k, self.num_experts
        margin = self.margin if prev_holds is not None else 0.0
        phy = phy.copy()
        counts = np.bincount(phy, minlength=num_experts)
        holds = self._holds(phy)
        # cost of holding (server, expert): 1 if the previous placement did not hold it there, else 0
        cost_of = np.zeros_like(holds) if prev_holds is None else (~prev_holds).astype(np.int64)
        expert_domain = self._expert_domain(group_map)
        eligible = np.ones(self.num_servers, bool) if domain is None else self.server_domain == domain
        # moves that lower the worst server but not (yet) the layer's worst load by the margin for each expert
        # they moved, as with two servers tied at the top, count only once later moves complete them: else
        # they are undone
        kept, kept_top, spent = phy.copy(), np.inf, 0
        for step in range(phy.shape[0] + 1):
            per_copy = w / counts
            load = np.bincount(self.slot_server, weights=per_copy[phy], minlength=self.num_servers)
            worst = int(np.argmax(np.where(eligible, load, -np.inf)))
            top = load[worst]
            if top < kept_top * (1 - margin * max(spent, 0)) - _REL_EPS * kept_top or step == 0:
                kept, kept_top, spent = phy.copy(), top, 0
            if top <= target or top <= 0 or step == phy.shape[0]:
                break
            lo = self.server_domain[worst] * self.servers_per_domain
            hi = lo + self.servers_per_domain
            move = _best_move(w, phy, counts, holds, cost_of, load, per_copy, worst, margin, k, lo, hi,
                              np.flatnonzero(expert_domain == self.server_domain[worst]), _REL_EPS * top)
            if move is None:
                break
            slot, expert, other_slot, cost = move
            spent += cost
            old = phy[slot]
            if other_slot is None:  # one slot changes expert
                counts[expert] += 1
                counts[old] -= 1
            else:  # two slots swap experts
                phy[other_slot] = old
                holds[self.slot_server[other_slot], expert] -= 1
                holds[self.slot_server[other_slot], old] += 1
            phy[slot] = expert
            holds[self.slot_server[slot], old] -= 1
            holds[self.slot_server[slot], expert] += 1
        return kept


def _best_move(w, phy, counts, holds, cost_of, load, per_copy, worst, margin, k, lo, hi, domain_experts, tiny):
    """The best single move that lowers the worst server by more than `margin` of its load for each expert it
    moves (one that moves none, or moves one back, only has to lower it), and raises no server to that lowered level, as (slot, new expert, None, cost) for
    a change of one slot or (slot, new expert, other slot, cost) for a swap; None when there is none. cost =
    experts it moves (cost_of; moving one back where it was is negative). Only servers lo..hi-1 (the worst
    one's domain) take part. Best = fewest experts moved, then the lowest peak among the servers involved,
    then the lowest slots."""
    top = load[worst]

    def limit(cost):  # every load a move of this cost raises must end below this
        return top * (1 - margin * np.maximum(cost, 0)) - tiny

    # R candidate moves, D servers of the domain
    own = np.arange(worst * k, (worst + 1) * k)
    domain_slots = np.arange(lo * k, hi * k)
    server = domain_slots // k  # of each domain slot
    candidates = []  # (cost, peak, slot, expert, other slot or -1)

    # swaps: a slot of the worst server with a slot of another server of the domain
    other = domain_slots[server != worst]
    if other.size:
        a, b, t = phy[own][:, None], phy[other][None, :], (other // k)[None, :]
        new_worst = load[worst] - per_copy[a] + per_copy[b]
        new_other = load[t] + per_copy[a] - per_copy[b]
        cost = ((holds[worst, b] == 0) * cost_of[worst, b] + (holds[t, a] == 0) * cost_of[t, a]
                - (holds[worst, a] == 1) * cost_of[worst, a] - (holds[t, b] == 1) * cost_of[t, b])
        valid = (a != b) & (new_worst < limit(cost)) & (new_other < limit(cost))
        if valid.any():
            i, j = np.nonzero(valid)
            candidates.append((cost[i, j], np.maximum(new_worst, new_other)[i, j], own[i], phy[other][j], other[j]))

    # one slot changes expert: a slot holding an expert with several copies takes (a) an expert of the worst
    # server, anywhere in the domain, or (b) any expert of the domain, on the worst server
    spare = domain_slots[counts[phy[domain_slots]] >= 2]
    mine = np.array(sorted(set(phy[own].tolist())), np.int64)
    slot_a = np.repeat(spare, mine.size)
    expert_a = np.tile(mine, spare.size)
    own_spare = own[counts[phy[own]] >= 2]
    # for (b) the worst server's new load grows with the new expert's load per copy, so only the lightest
    # few can be best, besides experts whose copy there costs no move
    lightest = domain_experts[np.argsort(w[domain_experts] / (counts[domain_experts] + 1), kind="stable")[:4]]
    free = (holds[worst, domain_experts] > 0) | (cost_of[worst, domain_experts] == 0 if cost_of.any() else False)
    pool = np.array(sorted(set(lightest.tolist()) | set(domain_experts[free].tolist())), np.int64)
    slot_b = np.repeat(own_spare, pool.size)
    expert_b = np.tile(pool, own_spare.size)
    slots = np.concatenate([slot_a, slot_b])
    experts = np.concatenate([expert_a, expert_b])
    keep = phy[slots] != experts
    slots, experts = slots[keep], experts[keep]
    if slots.size:
        olds = phy[slots]
        gain_copy = w[experts] / (counts[experts] + 1)  # the new expert's load per copy after the move
        lose_copy = w[olds] / (counts[olds] - 1)  # the old expert's, one copy fewer
        t = slots // k
        local = holds[lo:hi]
        delta = (local[:, experts].T * (gain_copy - per_copy[experts])[:, None]
                 + local[:, olds].T * (lose_copy - per_copy[olds])[:, None])
        rows = np.arange(slots.size)
        delta[rows, t - lo] += gain_copy - lose_copy
        new = load[lo:hi][None, :] + delta
        raised = delta > tiny
        cost = (holds[t, experts] == 0) * cost_of[t, experts] - (holds[t, olds] == 1) * cost_of[t, olds]
        below = limit(cost)
        valid = (new[:, worst - lo] < below) & ~(raised & (new >= below[:, None])).any(1)
        if valid.any():
            involved = raised.copy()
            involved[:, worst - lo] = True
            peak = np.where(involved, new, -np.inf).max(1)
            candidates.append((cost[valid], peak[valid], slots[valid], experts[valid],
                               np.full(int(valid.sum()), -1)))

    if not candidates:
        return None
    cost, peak, slot, expert, other_slot = (np.concatenate(parts) for parts in zip(*candidates))
    best = np.lexsort((other_slot, slot, expert, peak, cost))[0]
    return (int(slot[best]), int(expert[best]), None if other_slot[best] < 0 else int(other_slot[best]),
            int(cost[best]))


def _server_load_partial(w, counts, phy, k, num_servers) -> np.ndarray:
    """[S] server loads of a placement with free slots (-1), at `counts` copies per expert."""
    taken = phy >= 0
    return np.bincount(np.flatnonzero(taken) // k, weights=w[phy[taken]] / counts[phy[taken]], minlength=num_servers)


def _match(overlap: np.ndarray, capacity: int) -> np.ndarray:
    """Assign each row to a column, `capacity` rows per column, greedily by largest overlap (lowest row,
    then column, on ties); rows left over go to the first columns with room. Returns [rows] column."""
    out = np.full(overlap.shape[0], -1, np.int64)
    room = np.full(overlap.shape[1], capacity)
    rows, cols = np.nonzero(overlap > 0)
    for r, c in zip(*(x[np.lexsort((cols, rows, -overlap[rows, cols]))] for x in (rows, cols))):
        if out[r] < 0 and room[c] > 0:
            out[r], room[c] = c, room[c] - 1
    for r in np.flatnonzero(out < 0):
        c = int(np.flatnonzero(room > 0)[0])
        out[r], room[c] = c, room[c] - 1
    return out


def _align(experts: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """One server's `experts` ordered so that each one `prev` held stays in the slot it had there."""
    out = np.full(experts.shape[0], -1, np.int64)
    left = list(experts.tolist())
    for slot, e in enumerate(prev.tolist()):
        if e in left:
            out[slot] = e
            left.remove(e)
    out[out < 0] = left
    return out
