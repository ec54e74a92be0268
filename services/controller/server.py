"""The controller service: `tandem serve controller`.

A thin gRPC shell over libs/tandem/cluster: membership (`Membership`), the versioned expert placement
(`PlacementStore`) and the data plane's rendezvous, a `torch.distributed.TCPStore` this process hosts (it is
not a rank) and announces in every RegisterResponse. Standard gRPC health (NOT_SERVING until started and
while shutting down) and server reflection; SIGTERM/SIGINT shut it down gracefully.

A member listed by ListMembers with `is_ready = false` is either starting or down (no heartbeat within
`heartbeat_timeout_s`); a down member keeps its slot and rank until a replacement of its role registers.
With `--discovery kubernetes` the controller also watches the pools' pods (tandem.cluster.discovery) and marks
the members of a deleted pod down at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from concurrent import futures
from datetime import timedelta

import grpc
import torch.distributed as dist
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily

from tandem.cluster.config import ControllerConfig, add_config_flags, build_config
from tandem.cluster.discovery import PodWatcher, watch_pools
from tandem.cluster.membership import Member, Membership, MembershipError, Role, RoleFullError, Shape, UnknownMember
from tandem.cluster.placement_store import (PlacementError, PlacementStore, VersionNotFound, num_placement_layers,
                                            static_phy2log)
from tandem.cluster.signals import stop_on_signals
from tandem.model.config import ModelConfig
from tandem.moe.placement import Placement
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
                     rank=m.rank, is_ready=m.is_ready)


def placement_to_proto(p: Placement, num_slots_per_server: int) -> pb.Placement:
    return pb.Placement(version=p.version, num_logical_experts=p.num_logical, num_slots_per_server=num_slots_per_server,
                        layers=[pb.LayerPlacement(phy2log=row) for row in p.phy2log.tolist()])


class ControllerServicer(pb_grpc.ControllerServicer):
    """Translates between proto messages and the cluster library; bad input becomes a status with a message."""

    def __init__(self, membership: Membership, placements: PlacementStore, data_plane: pb.DataPlane,
                 heartbeat_interval_ms: int):
        self.membership = membership
        self.placements = placements
        self.data_plane = data_plane
        self.heartbeat_interval_ms = heartbeat_interval_ms

    def Register(self, request, context):
        role = _role(request.role, context, allow_unspecified=False)
        try:
            member = self.membership.register(role, request.address)
        except RoleFullError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except MembershipError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("registered %s %s at %s: index %d, rank %d", role.value, member.member_id, member.address,
                 member.index, member.rank)
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


def _role(value: int, context: grpc.ServicerContext, allow_unspecified: bool) -> Role | None:
    if value == pb.ROLE_UNSPECIFIED and allow_unspecified:
        return None
    if value not in ROLES:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"role {value} is not one of gateway, prefill, decode, expert")
    return ROLES[value]


class _MembershipMetrics:
    """Prometheus gauges read from the library objects at scrape time."""

    def __init__(self, membership: Membership, placements: PlacementStore):
        self.membership, self.placements = membership, placements

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


class ControllerServer:
    """The controller's library objects, gRPC server, rendezvous store and metrics, built from its config."""

    def __init__(self, config: ControllerConfig):
        model = ModelConfig.from_file(config.model_dir)
        shape = Shape(config.num_prefill, config.num_decode, config.num_expert_servers, config.num_gateways)
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
        self.health = health.HealthServicer()
        # every member holds a WatchPlacement stream (a thread each) besides its unary calls
        workers = 2 * (shape.world_size + max(config.num_gateways, 1)) + 8
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="controller"))
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {config.host}:{config.port}")
        self.store: dist.TCPStore | None = None
        self._metrics_http = None

    def start(self) -> "ControllerServer":
        """Host the rendezvous store, then serve; health turns SERVING once everything runs."""
        config = self.config
        # world_size None: the members join as ranks of the data plane; the store is not a rank itself
        self.store = dist.TCPStore(config.store_host, config.store_port, None, is_master=True,
                                   timeout=timedelta(seconds=30), wait_for_workers=False)
        data_plane = pb.DataPlane(store_host=config.store_host, store_port=self.store.port,
                                  world_size=self.membership.shape.world_size, backend=config.backend)
        servicer = ControllerServicer(self.membership, self.placements, data_plane,
                                      round(config.heartbeat_interval_s * 1000))
        pb_grpc.add_ControllerServicer_to_server(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (pb.DESCRIPTOR.services_by_name["Controller"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        for name in ("", names[0]):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if config.metrics_port:
            registry = CollectorRegistry()
            registry.register(_MembershipMetrics(self.membership, self.placements))
            self._metrics_http, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
        if self.discovery is not None:
            self.discovery.start()
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
        self.placements.close()
        self.server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
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
