"""The controller service: `tandem serve controller`.

A thin gRPC shell over libs/tandem/cluster: membership (`Membership`), the versioned expert placement
(`PlacementStore`) and the data plane's rendezvous, a `torch.distributed.TCPStore` this process hosts (it is
not a rank) and announces in every RegisterResponse. Standard gRPC health (NOT_SERVING until started and
while shutting down) and server reflection; SIGTERM/SIGINT shut it down gracefully.

A member listed by ListMembers with `is_ready = false` is either starting or down (no heartbeat within
`heartbeat_timeout_s`); a down member keeps its slot and rank until a replacement of its role registers.
With `--discovery kubernetes` the controller also watches the pools' pods (tandem.cluster.discovery) and marks
the members of a deleted pod down at once.

Expert load balancing (on when `redis_url` is set): a `Rebalancer` (tandem.eplb.rebalancer) re-plans the placement
from the expert servers' statistics in Redis every `rebalance_interval_s` (0 = never by itself) and on the
Rebalance RPC (`tandem eplb rebalance`); it stages the new experts on the expert servers over gRPC
(tandem.cluster.expert_fleet), publishes the new version, and frees the old copies once every prefill and decode
worker acknowledged it. Without `redis_url`, Rebalance answers FAILED_PRECONDITION. Redis being unreachable
never stops serving: the placement stays, the controller logs it once (and once when it answers again), and
`tandem_eplb_redis_up` is 0 meanwhile.

Metrics (with `metrics_port`): `tandem_controller_members{role,state}`, `tandem_controller_placement_version`, and
with load balancing on `tandem_eplb_redis_up`, `tandem_eplb_rebalances_total{outcome="applied"|"failed"}` (failed:
staging failed or the re-plan raised; the old placement kept serving), `tandem_eplb_balancedness{placement=
"serving"|"planned"}` (mean over MoE layers, under the statistics of the last re-plan that read any) and
`tandem_eplb_moved_experts_total` (experts the servers loaded for applied re-plans).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from concurrent import futures
from datetime import timedelta
from pathlib import Path

import grpc
import torch.distributed as dist
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.cluster.config import ControllerConfig, add_config_flags, build_config
from tandem.cluster.discovery import PodWatcher, watch_pools
from tandem.cluster.expert_fleet import GrpcExpertFleet, RedisLoad
from tandem.cluster.membership import Member, Membership, MembershipError, Role, RoleFullError, Shape, UnknownMember
from tandem.cluster.placement_proto import placement_to_proto
from tandem.cluster.placement_store import (PlacementError, PlacementStore, VersionNotFound, num_placement_layers,
                                            static_phy2log)
from tandem.cluster.signals import stop_on_signals
from tandem.eplb.planner import ClusterShape
from tandem.eplb.rebalancer import RebalanceOutcome, Rebalancer, RebalanceSettings
from tandem.model.config import ModelConfig
from tandem.v1 import controller_pb2 as pb
from tandem.v1 import controller_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = "controller"
ROLES = {pb.ROLE_GATEWAY: Role.GATEWAY, pb.ROLE_PREFILL: Role.PREFILL, pb.ROLE_DECODE: Role.DECODE,
         pb.ROLE_EXPERT: Role.EXPERT}
ROLE_TO_PROTO = {role: number for number, role in ROLES.items()}
WATCH_POLL_S = 0.5  # how soon a watch stream notices its client went away


def member_to_proto(m: Member) -> pb.Member:
    return pb.Member(member_id=m.member_id, role=ROLE_TO_PROTO[m.role], address=m.address, index=m.index,
                     rank=m.rank, is_ready=m.is_ready, node=m.node)


class ControllerRebalancer(Rebalancer):
    """The rebalancer plus the totals the controller's metrics export."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_errors = 0  # re-plans that raised
        self.num_moved = 0  # experts loaded for applied re-plans
        self.last_planned: RebalanceOutcome | None = None  # the last re-plan that read statistics and planned
        self._totals_lock = threading.Lock()  # the periodic thread and the RPC both re-plan

    def rebalance(self, force: bool = False) -> RebalanceOutcome:
        try:
            outcome = super().rebalance(force)
        except Exception:
            with self._totals_lock:
                self.num_errors += 1
            raise
        with self._totals_lock:
            if outcome.applied:
                self.num_moved += outcome.moved
            if outcome.balancedness_after > 0:
                self.last_planned = outcome
        return outcome


class ControllerServicer(pb_grpc.ControllerServicer):
    """Translates between proto messages and the cluster library; bad input becomes a status with a message."""

    def __init__(self, membership: Membership, placements: PlacementStore, data_plane: pb.DataPlane,
                 heartbeat_interval_ms: int, rebalancer: Rebalancer | None = None):
        self.membership = membership
        self.placements = placements
        self.data_plane = data_plane
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.rebalancer = rebalancer

    def Register(self, request, context):
        role = _role(request.role, context, allow_unspecified=False)
        try:
            member = self.membership.register(role, request.address, request.node)
        except RoleFullError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except MembershipError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("registered %s %s at %s%s: index %d, rank %d", role.value, member.member_id, member.address,
                 f" on node {member.node}" if member.node else "", member.index, member.rank)
        return pb.RegisterResponse(member=member_to_proto(member),
                                   data_plane=self.data_plane if member.rank >= 0 else None,
                                   heartbeat_interval_ms=self.heartbeat_interval_ms)

    def Heartbeat(self, request, context):
        if not request.member_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "member_id is empty")
        try:
            self.membership.heartbeat(request.member_id, request.is_ready)
        except UnknownMember as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        return pb.HeartbeatResponse(placement_version=self.placements.version)

    def ListMembers(self, request, context):
        role = _role(request.role, context, allow_unspecified=True)
        return pb.ListMembersResponse(members=[member_to_proto(m) for m in self.membership.members(role)])

    def GetPlacement(self, request, context):
        try:
            placement = self.placements.get(request.version)
        except VersionNotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except PlacementError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version: {e}")
        return placement_to_proto(placement, self.placements.num_slots_per_server)

    def WatchPlacement(self, request, context):
        if request.known_version < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"known_version {request.known_version} is negative")
        known = request.known_version
        while context.is_active() and not self.placements.is_closed:
            placement = self.placements.wait_newer(known, timeout=WATCH_POLL_S)
            if placement is not None:
                known = placement.version
                yield placement_to_proto(placement, self.placements.num_slots_per_server)

    def AckPlacement(self, request, context):
        if request.version < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"version {request.version} must be at least 1")
        try:
            self.membership.get(request.member_id)
            self.placements.ack(request.member_id, request.version)
        except UnknownMember as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except PlacementError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.AckPlacementResponse()

    def Rebalance(self, request, context):
        if self.rebalancer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "expert load balancing is off: the controller has no "
                          "redis_url (set --redis-url or TANDEM_CONTROLLER_REDIS_URL to the expert servers' Redis)")
        try:
            outcome = self.rebalancer.rebalance(force=request.force)
        except Exception as e:  # a bug in a re-plan must not take the controller down
            log.exception("rebalance failed")
            context.abort(grpc.StatusCode.INTERNAL, f"rebalance failed, placement version {self.placements.version} "
                          f"keeps serving: {e}")
        return pb.RebalanceResponse(applied=outcome.applied, reason=outcome.reason, placement_version=outcome.version,
                                    balancedness_before=outcome.balancedness_before,
                                    balancedness_after=outcome.balancedness_after, num_moved_experts=outcome.moved)


def _role(value: int, context: grpc.ServicerContext, allow_unspecified: bool) -> Role | None:
    if value == pb.ROLE_UNSPECIFIED and allow_unspecified:
        return None
    if value not in ROLES:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role {value} is not one of gateway, prefill, decode, expert")
    return ROLES[value]


class _MembershipMetrics:
    """Prometheus metrics read from the library objects at scrape time."""

    def __init__(self, membership: Membership, placements: PlacementStore,
                 rebalancer: ControllerRebalancer | None = None, redis_load: RedisLoad | None = None):
        self.membership, self.placements = membership, placements
        self.rebalancer, self.redis_load = rebalancer, redis_load

    def collect(self):
        members = GaugeMetricFamily("tandem_controller_members", "Registered members by role and state",
                                    labels=["role", "state"])
        found = self.membership.members()
        for role in Role:
            of_role = [m for m in found if m.role is role]
            for state, n in (("ready", sum(m.is_ready for m in of_role)),
                             ("alive", sum(m.is_alive for m in of_role)),
                             ("down", sum(not m.is_alive for m in of_role))):
                members.add_metric([role.value, state], n)
        yield members
        yield GaugeMetricFamily("tandem_controller_placement_version", "Current expert placement version",
                                value=self.placements.version)
        if self.rebalancer is None:
            return
        r = self.rebalancer
        yield GaugeMetricFamily("tandem_eplb_redis_up", "1 while Redis with the expert-load statistics answers",
                                value=float(self.redis_load.is_up))
        rebalances = CounterMetricFamily("tandem_eplb_rebalances", "Re-plans that published a new placement "
                                         "(applied) or that failed, leaving the old one serving", labels=["outcome"])
        rebalances.add_metric(["applied"], r.num_applied)
        rebalances.add_metric(["failed"], r.num_failed + r.num_errors)
        yield rebalances
        balance = GaugeMetricFamily("tandem_eplb_balancedness", "Mean over MoE layers of mean / max expert-server "
                                    "load under the last re-plan's statistics: the placement serving then, and the "
                                    "plan", labels=["placement"])
        last = r.last_planned
        if last is not None:
            balance.add_metric(["serving"], last.balancedness_before)
            balance.add_metric(["planned"], last.balancedness_after)
        yield balance
        yield CounterMetricFamily("tandem_eplb_moved_experts", "Experts the expert servers loaded for applied "
                                  "re-plans", value=r.num_moved)


class ControllerServer:
    """The controller's library objects, gRPC server, rendezvous store and metrics, built from its config."""

    def __init__(self, config: ControllerConfig):
        model = ModelConfig.from_file(config.model_dir)
        shape = Shape(config.num_prefill, config.num_decode, config.num_expert_servers, config.num_gateways,
                      num_expert_nodes=config.num_nodes)
        self.config = config
        # 0 slots per server: just enough for each logical expert once (ceil(E / S))
        self.num_slots_per_server = (config.num_slots_per_server
                                     or -(-model.n_routed_experts // max(config.num_expert_servers, 1)))
        self.membership = Membership(shape, config.heartbeat_timeout_s)
        # --discovery kubernetes: watch the pools' pods; a deleted pod's members are marked down at once
        self.discovery: PodWatcher | None = None
        if config.discovery == "kubernetes":
            self.discovery = watch_pools(self.membership, namespace=config.namespace,
                                         pod_selector=config.pod_selector, role_label=config.role_label,
                                         kubeconfig=config.kubeconfig)
        initial = static_phy2log(num_placement_layers(model), model.n_routed_experts, config.num_expert_servers,
                                 self.num_slots_per_server)
        self.placements = PlacementStore(initial, model.n_routed_experts, self.num_slots_per_server,
                                         config.placement_history)
        self.fleet: GrpcExpertFleet | None = None
        self.redis_load: RedisLoad | None = None
        self.rebalancer: ControllerRebalancer | None = None
        if config.redis_url:
            self._build_rebalancer(model)
        self.health = health.HealthServicer()
        # every member holds a WatchPlacement stream (a thread each) besides its unary calls
        workers = 2 * (shape.world_size + max(config.num_gateways, 1)) + 8
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="controller"))
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {config.host}:{config.port}")
        self.store: dist.TCPStore | None = None
        self._metrics_http = None

    def _build_rebalancer(self, model: ModelConfig) -> None:
        """The expert load balancing of `redis_url`: the statistics, the planner's shape, the fleet."""
        config = self.config
        shape = ClusterShape(config.num_expert_servers, self.num_slots_per_server, config.num_nodes, model.n_group)
        try:
            shape.resolve_policy(config.eplb_policy, model.n_routed_experts)
        except ValueError as e:
            raise ValueError(f"eplb_policy: {e}") from None
        settings = RebalanceSettings(shape=shape, policy=config.eplb_policy, margin=config.rebalance_margin,
                                     min_gain=config.rebalance_min_gain, windows=config.rebalance_windows,
                                     decay=config.rebalance_decay, interval_s=config.rebalance_interval_s,
                                     ack_timeout_s=config.ack_timeout_s)
        self.stats_model_name = config.stats_model_name or Path(config.model_dir).resolve().name
        self.redis_load = RedisLoad(config.redis_url, self.stats_model_name, self.placements.shape[0],
                                    model.n_routed_experts, url_for_logs=config.redis_url_redacted)
        self.fleet = GrpcExpertFleet(self.membership, self.num_slots_per_server, config.stage_timeout_s)
        self.rebalancer = ControllerRebalancer(settings, self.placements, self.redis_load, self.fleet)

    def start(self) -> "ControllerServer":
        """Host the rendezvous store, then serve; health turns SERVING once everything runs."""
        config = self.config
        # world_size None: the members join as ranks of the data plane; the store is not a rank itself
        self.store = dist.TCPStore(config.store_host, config.store_port, None, is_master=True,
                                   timeout=timedelta(seconds=30), wait_for_workers=False)
        data_plane = pb.DataPlane(store_host=config.store_host, store_port=self.store.port,
                                  world_size=self.membership.shape.world_size, backend=config.backend)
        servicer = ControllerServicer(self.membership, self.placements, data_plane,
                                      round(config.heartbeat_interval_s * 1000), self.rebalancer)
        pb_grpc.add_ControllerServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Controller"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        for name in ("", names[0]):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.metrics_port:
            registry = CollectorRegistry()
            registry.register(_MembershipMetrics(self.membership, self.placements, self.rebalancer, self.redis_load))
            self._metrics_http, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
        if self.discovery is not None:
            self.discovery.start()
        if self.rebalancer is not None:
            self.redis_load.start()
            self.rebalancer.start()
            s = self.rebalancer.settings
            log.info("expert load balancing: statistics of model %r from %s; re-plan %s, policy %s (resolved: %s) "
                     "on %d servers x %d slots over %d node(s)", self.stats_model_name, config.redis_url_redacted,
                     f"every {s.interval_s:g} s and on demand" if s.interval_s else "on demand only", s.policy,
                     s.shape.resolve_policy(s.policy, self.placements.num_logical), s.shape.num_servers,
                     s.shape.slots_per_server, s.shape.num_nodes)
        self.server.start()
        for name in ("", names[0]):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("controller serving on %s:%d; data-plane store %s:%d (%s, world %d); placement %d layers x %d "
                 "slots", config.host, self.port, config.store_host, self.store.port, config.backend,
                 data_plane.world_size, *self.placements.shape)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, end the watch streams, let in-flight calls finish within the grace period."""
        self.health.enter_graceful_shutdown()
        if self.rebalancer is not None:
            self.rebalancer.stop()  # waits for a re-plan in progress (up to 30 s)
        self.placements.close()
        self.server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        if self.rebalancer is not None:
            self.redis_load.stop()
            self.fleet.close()
        if self.discovery is not None:
            self.discovery.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.store = None  # the store's server thread ends with the last reference


def serve(config: ControllerConfig) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = ControllerServer(config).start()
    with stop_on_signals(threading.Event()) as stop:
        stop.wait()
        log.info("controller shutting down")
        server.stop()
    return 0


def add_controller_parser(serve_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`serve controller`: every ControllerConfig field as a flag."""
    p = serve_sub.add_parser(SERVICE, help="cluster membership, data-plane rendezvous and expert placement",
                             description=_description())
    add_config_flags(p, ControllerConfig, SERVICE)
    p.set_defaults(func=_cmd_serve)
    return p


def _description() -> str:
    return ("Run the controller: members register and heartbeat here, it hosts the data plane's rendezvous "
            "store and serves the versioned expert placement. Settings come from --config YAML < environment "
            "(TANDEM_CONTROLLER_<FIELD>) < flags.")


def _cmd_serve(args: argparse.Namespace) -> int:
    return serve(build_config(ControllerConfig, SERVICE, args, os.environ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem serve controller", description=_description())
    add_config_flags(parser, ControllerConfig, SERVICE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = build_config(ControllerConfig, SERVICE, args, os.environ)
        return serve(config)
    except ValueError as e:  # ConfigError, a model config.json or placement the controller cannot use
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
