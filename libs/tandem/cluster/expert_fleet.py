"""What the controller's `Rebalancer` (tandem.eplb.rebalancer) runs on: the expert servers over gRPC and the
expert-load statistics in Redis.

- `GrpcExpertFleet` is the rebalancer's `ExpertFleet`. The expert servers are the expert members of the
  membership (their registered addresses). `stage` sends LoadExperts(placement) to every one of them at
  once, each call bounded by `stage_timeout_s`, and raises `FleetError` naming every server that failed
  (after all calls have ended, so the rebalancer's clean-up never races a load still running). `release`
  sends UnloadExperts(keep_version) to every one. `attention_members` are the ready prefill and decode
  members: the ones that must acknowledge a new version.
- `RedisLoad` is the rebalancer's `read_load`: `tandem.eplb.stats.read_load` for the placement's MoE layers
  and the model's routed experts, as numpy. It also knows whether Redis answers (`is_up`, the controller's
  `tandem_eplb_redis_up`): every read sets it, and so does a PING every `check_interval_s` from a daemon
  thread, so the metric follows Redis between re-plans. It logs once when Redis becomes unreachable (serving
  goes on with the current placement) and once when it answers again (statistics resume: the client
  reconnects by itself).
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
import numpy as np
import redis

from tandem.cluster.membership import Member, Membership, Role
from tandem.cluster.placement_proto import placement_to_proto
from tandem.eplb import stats
from tandem.moe.placement import Placement
from tandem.v1 import expert_pb2 as epb
from tandem.v1 import expert_pb2_grpc as epb_grpc

log = logging.getLogger(__name__)
RELEASE_TIMEOUT_S = 30.0  # one UnloadExperts call (freeing memory is quick)
REDIS_CHECK_INTERVAL_S = 5.0


class FleetError(RuntimeError):
    """Some expert servers could not do what they were asked; the message names each and why."""


class GrpcExpertFleet:
    """The expert servers of one deployment, reached at the addresses they registered; thread-safe."""

    def __init__(self, membership: Membership, num_slots_per_server: int, stage_timeout_s: float,
                 release_timeout_s: float = RELEASE_TIMEOUT_S):
        self.membership = membership
        self.num_slots_per_server = num_slots_per_server
        self.stage_timeout_s = stage_timeout_s
        self.release_timeout_s = release_timeout_s
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}

    def stage(self, placement: Placement) -> None:
        """Every expert server of the deployment loads its slots of `placement` beside what it serves."""
        servers = self._expert_servers(need_ready=True)
        request = epb.LoadExpertsRequest(placement=placement_to_proto(placement, self.num_slots_per_server))
        loaded = self._call_all(servers, "LoadExperts", request, self.stage_timeout_s,
                                f"staging placement version {placement.version}")
        log.info("placement version %d staged on %d expert servers (%d experts loaded)", placement.version,
                 len(servers), sum(r.num_loaded_experts for r in loaded))

    def release(self, keep_version: int) -> None:
        """Every registered expert server keeps only placement version `keep_version`."""
        servers = self._expert_servers(need_ready=False)
        freed = self._call_all(servers, "UnloadExperts", epb.UnloadExpertsRequest(keep_version=keep_version),
                               self.release_timeout_s, f"keeping only placement version {keep_version}")
        log.info("expert servers keep placement version %d only (%d experts freed)", keep_version,
                 sum(r.num_unloaded_experts for r in freed))

    def attention_members(self) -> set[str]:
        return {m.member_id for m in self.membership.members()
                if m.role in (Role.PREFILL, Role.DECODE) and m.is_ready}

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def _expert_servers(self, need_ready: bool) -> list[Member]:
        """The expert members; with `need_ready`, FleetError unless every slot of the shape is held by a ready
        one (a placement has slots on every server: one missing could not serve them)."""
        servers = self.membership.members(Role.EXPERT)
        if not need_ready:
            return servers
        expected = self.membership.shape.num_expert_servers
        by_index = {m.index: m for m in servers}
        problems = [f"expert server {i}: " + ("not registered" if i not in by_index else
                                              f"{by_index[i].address} is not ready")
                    for i in range(expected) if i not in by_index or not by_index[i].is_ready]
        if problems:
            raise FleetError("; ".join(problems))
        return [by_index[i] for i in range(expected)]

    def _call_all(self, servers: list[Member], method: str, request, timeout_s: float, what: str) -> list:
        """`method(request)` on every server in parallel; the replies in order, or FleetError naming every
        server that failed, once all calls have ended."""
        if not servers:
            return []
        with futures.ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="expert-fleet") as pool:
            calls = [pool.submit(getattr(self._stub(m.address), method), request, timeout=timeout_s)
                     for m in servers]
            futures.wait(calls)
        failed = []
        for m, call in zip(servers, calls):
            error = call.exception()
            if isinstance(error, grpc.RpcError):
                failed.append(f"expert server {m.index} ({m.address}): {error.code().name}: {error.details()}")
            elif error is not None:
                failed.append(f"expert server {m.index} ({m.address}): {error}")
        if failed:
            raise FleetError(f"{what} failed on {'; '.join(failed)}")
        return [call.result() for call in calls]

    def _stub(self, address: str) -> epb_grpc.ExpertServerStub:
        with self._lock:
            if address not in self._channels:
                self._channels[address] = grpc.insecure_channel(address)
            return epb_grpc.ExpertServerStub(self._channels[address])


class RedisLoad:
    """The expert load in Redis, [layers, experts] per `read_load(windows, decay)`, and whether Redis answers."""

    def __init__(self, url: str, model: str, num_layers: int, num_experts: int, *, url_for_logs: str | None = None,
                 timeout_s: float = 1.0, check_interval_s: float = REDIS_CHECK_INTERVAL_S):
        self.model = model
        self.num_layers, self.num_experts = num_layers, num_experts
        self.url_for_logs = url_for_logs or url
        self.check_interval_s = check_interval_s
        self.client = stats.connect(url, timeout_s)
        self.is_up = True  # until a read or a check says otherwise
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, windows: int, decay: float) -> np.ndarray:
        try:
            load = stats.read_load(self.client, self.model, self.num_layers, self.num_experts, windows, decay)
        except redis.RedisError as e:
            self._set_up(False, e)
            raise
        self._set_up(True)
        return load.numpy()

    def check(self) -> bool:
        """PING Redis; updates and returns `is_up`."""
        try:
            self.client.ping()
        except redis.RedisError as e:
            self._set_up(False, e)
        else:
            self._set_up(True)
        return self.is_up

    def start(self) -> RedisLoad:
        """Check now, then every `check_interval_s` from a daemon thread until `stop`."""
        self.check()
        self._thread = threading.Thread(target=self._run, name="redis-check", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.check_interval_s):
            self.check()

    def _set_up(self, up: bool, error: Exception | None = None) -> None:
        with self._state_lock:
            was, self.is_up = self.is_up, up
        if was and not up:
            log.warning("expert-load statistics: Redis at %s is unreachable (%s); serving goes on with the current "
                        "placement, re-plans wait for the statistics", self.url_for_logs, error)
        elif up and not was:
            log.info("expert-load statistics: Redis at %s answers again; statistics resume", self.url_for_logs)
