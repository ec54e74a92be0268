"""Cluster membership: who has registered, in which slot of the deployment's fixed shape, and who is alive.

Each role has a fixed number of slots (index 0 .. n-1). A data-plane member's rank follows from its role
and index by the layout of `tandem.transport.group.Roles`: attention workers first (prefill 0 .. P-1, then
decode P .. P+D-1), expert servers after them. Gateways are not on the data plane (rank -1).

- A member that registers again with the same role and address (a restarted process) gets its old record
  back: same id, index and rank.
- A member whose last heartbeat is older than `heartbeat_timeout_s` is down. It keeps its slot until a new
  member of the same role registers; that one takes over the slot (and rank) and the old record is forgotten,
  so the old id's heartbeats are answered with `UnknownMember` (register again).
- A member can be marked down at once (`mark_down`: its pod was deleted), with the same consequences.
- A role whose slots are all held by live members refuses a new member (`RoleFullError`).
- Expert servers spread over several nodes (`num_expert_nodes` > 1, for the hierarchical expert placement,
  which puts server i on node i // servers_per_node) say which node they run on. A node's servers get the
  indices of one block: the block its live servers already hold, else the lowest block without a live server
  of another node. Kubernetes places pods where it likes, so ordinals alone could not promise this.

Liveness is computed from the clock when asked, so no background thread is needed. Thread-safe.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from tandem.transport.group import Roles


class Role(enum.Enum):
    GATEWAY = "gateway"
    PREFILL = "prefill"
    DECODE = "decode"
    EXPERT = "expert"


class MembershipError(ValueError):
    """A registration or heartbeat the controller refuses; the message says why."""


class RoleFullError(MembershipError):
    """Every slot of the role is held by a live member."""


class UnknownMember(MembershipError, KeyError):
    """No member has this id (never registered, or replaced after it went down)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class Member:
    """One registered process. `rank` is -1 for members not on the data plane."""

    member_id: str
    role: Role
    address: str
    index: int
    rank: int
    is_ready: bool
    is_alive: bool
    last_heartbeat: float
    node: str = ""  # the machine it runs on, as it said at registration ("" = not said)


@dataclass(frozen=True, slots=True)
class Shape:
    """How many members of each role the deployment has; 0 gateways = any number."""

    num_prefill: int
    num_decode: int
    num_expert_servers: int
    num_gateways: int = 1
    num_expert_nodes: int = 1  # nodes the expert servers are spread over evenly, one block of indices each

    def __post_init__(self) -> None:
        Roles(self.num_prefill + self.num_decode, self.num_expert_servers)  # checks the counts
        if self.num_prefill < 0 or self.num_decode < 0 or self.num_gateways < 0:
            raise ValueError(f"negative counts in {self}")
        if self.num_expert_nodes < 1 or self.num_expert_servers % self.num_expert_nodes:
            raise ValueError(f"{self.num_expert_servers} expert servers cannot be spread evenly over "
                             f"{self.num_expert_nodes} nodes")

    @property
    def expert_servers_per_node(self) -> int:
        return self.num_expert_servers // self.num_expert_nodes

    @property
    def roles(self) -> Roles:
        return Roles(self.num_prefill + self.num_decode, self.num_expert_servers)

    @property
    def world_size(self) -> int:
        return self.roles.world_size

    def capacity(self, role: Role) -> int | None:
        """Slots of `role`; None = unlimited."""
        return {Role.PREFILL: self.num_prefill, Role.DECODE: self.num_decode,
                Role.EXPERT: self.num_expert_servers, Role.GATEWAY: self.num_gateways or None}[role]

    def rank(self, role: Role, index: int) -> int:
        """Data-plane rank of member `index` of `role` (-1 for gateways)."""
        if role is Role.PREFILL:
            return self.roles.attention_rank(index)
        if role is Role.DECODE:
            return self.roles.attention_rank(self.num_prefill + index)
        if role is Role.EXPERT:
            return self.roles.expert_rank(index)
        return -1


def check_address(address: str) -> str:
    """`host:port` with a port in 1..65535 (IPv6 hosts in brackets); returns it stripped."""
    address = address.strip()
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MembershipError(f"address {address!r} is not host:port")
    return address


class Membership:
    """The registered members of one deployment (see the module docstring for the rules)."""

    def __init__(self, shape: Shape, heartbeat_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        if heartbeat_timeout_s <= 0:
            raise ValueError(f"heartbeat_timeout_s must be positive, got {heartbeat_timeout_s}")
        self.shape = shape
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_id: dict[str, Member] = {}
        self._serial = itertools.count()

    def register(self, role: Role, address: str, node: str = "") -> Member:
        """Admit a member (or re-admit one with the same role and address); RoleFullError if no slot is free
        (for an expert server on several nodes: none in its node's block)."""
        address, node = check_address(address), node.strip()
        by_node = role is Role.EXPERT and self.shape.num_expert_nodes > 1
        if by_node and not node:
            raise MembershipError(f"the expert servers are spread over {self.shape.num_expert_nodes} nodes: an expert "
                                  "server must say which node it runs on (its --node setting)")
        with self._lock:
            now = self._clock()
            for m in list(self._by_id.values()):
                if m.role is not role or m.address != address:
                    continue
                if by_node and (m.node != node or self._block_taken(m, now)):
                    del self._by_id[m.member_id]  # moved, or its block went to another node while it was down
                    break
                member = replace(m, is_ready=False, last_heartbeat=now)
                self._by_id[m.member_id] = member
                return self._view(member, now)
            index = self._free_index_on_node(node, now) if by_node else self._free_index(role, now)
            member = Member(member_id=f"{role.value}-{next(self._serial)}-{uuid.uuid4().hex[:8]}", role=role,
                            address=address, index=index, rank=self.shape.rank(role, index), is_ready=False,
                            is_alive=True, last_heartbeat=now, node=node)
            self._by_id[member.member_id] = member
            return self._view(member, now)

    def heartbeat(self, member_id: str, is_ready: bool) -> Member:
        """Record that the member is alive (and whether it serves); UnknownMember if the id is not known."""
        with self._lock:
            if member_id not in self._by_id:
                raise UnknownMember(f"member {member_id!r} is not registered (register again)")
            now = self._clock()
            member = replace(self._by_id[member_id], is_ready=is_ready, last_heartbeat=now)
            self._by_id[member_id] = member
            return self._view(member, now)

    def mark_down(self, member_id: str) -> Member:
        """Count a member down now, as if its heartbeats had stopped long ago (its process is known to be gone,
        e.g. discovery saw its pod deleted); a later heartbeat from it counts it alive again."""
        with self._lock:
            if member_id not in self._by_id:
                raise UnknownMember(f"member {member_id!r} is not registered")
            member = replace(self._by_id[member_id], is_ready=False, last_heartbeat=float("-inf"))
            self._by_id[member_id] = member
            return self._view(member, self._clock())

    def get(self, member_id: str) -> Member:
        with self._lock:
            if member_id not in self._by_id:
                raise UnknownMember(f"member {member_id!r} is not registered")
            return self._view(self._by_id[member_id], self._clock())

    def members(self, role: Role | None = None) -> list[Member]:
        """Members (alive or down) of `role`, or of every role, ordered by role then index."""
        order = list(Role)
        with self._lock:
            now = self._clock()
            found = [self._view(m, now) for m in self._by_id.values() if role is None or m.role is role]
        return sorted(found, key=lambda m: (order.index(m.role), m.index))

    def alive_ids(self, roles: tuple[Role, ...] = (Role.PREFILL, Role.DECODE, Role.EXPERT)) -> set[str]:
        """Ids of the live members of `roles` (by default the data plane's)."""
        return {m.member_id for m in self.members() if m.role in roles and m.is_alive}

    def _alive(self, member: Member, now: float) -> bool:
        return now - member.last_heartbeat <= self.heartbeat_timeout_s

    def _view(self, member: Member, now: float) -> Member:
        return replace(member, is_alive=self._alive(member, now),
                       is_ready=member.is_ready and self._alive(member, now))

    def _free_index(self, role: Role, now: float, indices: range | None = None) -> int:
        """The lowest slot of `role` (among `indices`) held by nobody or by a down member (who is then
        forgotten)."""
        holders = {m.index: m for m in self._by_id.values() if m.role is role}
        capacity = self.shape.capacity(role)
        if indices is None:
            indices = itertools.count() if capacity is None else range(capacity)
        for index in indices:
            holder = holders.get(index)
            if holder is None:
                return index
            if not self._alive(holder, now):
                del self._by_id[holder.member_id]
                return index
        raise RoleFullError(f"all {capacity} {role.value} slots are held by live members "
                            f"({', '.join(sorted(m.address for m in holders.values()))})")

    def _block_taken(self, member: Member, now: float) -> bool:
        """A live expert server of another node holds a slot in `member`'s block."""
        per_node = self.shape.expert_servers_per_node
        return any(m.role is Role.EXPERT and m.node != member.node and m.index // per_node == member.index // per_node
                   and self._alive(m, now) for m in self._by_id.values())

    def _free_index_on_node(self, node: str, now: float) -> int:
        """An expert slot in `node`'s block of indices (see the module docstring)."""
        per_node = self.shape.expert_servers_per_node
        live = [m for m in self._by_id.values() if m.role is Role.EXPERT and self._alive(m, now)]
        mine = {m.index // per_node for m in live if m.node == node}
        taken = {m.index // per_node for m in live if m.node != node}
        free = [b for b in range(self.shape.num_expert_nodes) if b not in taken]
        if not mine and not free:
            raise RoleFullError(f"expert server on node {node!r}: each of the {self.shape.num_expert_nodes} node "
                                "blocks of expert slots is held by live servers of another node (more nodes than "
                                "num_nodes?)")
        block = min(mine) if mine else free[0]  # a node's live servers share one block: register keeps it so
        try:
            return self._free_index(Role.EXPERT, now, range(block * per_node, (block + 1) * per_node))
        except RoleFullError:
            raise RoleFullError(f"node {node!r} already runs its {per_node} expert servers (slots "
                                f"{block * per_node}..{(block + 1) * per_node - 1}); num_expert_servers / num_nodes "
                                "servers per node are expected") from None
