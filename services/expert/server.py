"""The expert server: `tandem serve expert`.

config -> register with the controller -> this server's experts -> data plane -> ExpertWorker -> the
ExpertServer gRPC API, health and reflection.

Start-up, in order:
1. The gRPC server starts at once with health NOT_SERVING, so health and GetStats answer while loading.
2. Register (role expert, this server's gRPC address) gives its index, data-plane rank and the rendezvous;
   heartbeats start right away (is_ready false until serving), so a long load does not look like a death.
3. GetPlacement gives the current placement. The server loads the experts of its slots
   [index * slots_per_server, (index + 1) * slots_per_server) in every placement row (the model's MoE layers,
   MTP included: `moe_layer_ids`), reading only those experts' tensors from the checkpoint.
4. A background thread joins the data plane (it blocks until every rank of the deployment has joined), then
   serves the attention ranks with an `ExpertWorker`. Health turns SERVING once joined.

The data plane's roles are derived, not listed: expert servers = placement slots / slots per server, attention
workers = the announced world size - expert servers (tandem.transport.group's layout: attention ranks first).
ListMembers could not give them, as it lists only the members registered so far.

Health goes NOT_SERVING again at shutdown, and when every attention rank has left the plane (sent its
shutdown or broke its connection): nothing can reach the experts any more and the plane cannot be rejoined.

Load statistics: the tokens each logical expert receives are added to in-memory totals (GetStats, and the
Prometheus counter) and, when `redis_url` is set, to an `ExpertLoadRecorder` that a background thread
flushes to Redis every `stats_flush_interval_s` (key schema in tandem.eplb.stats). There and in GetStats,
`layer` is the placement row (MoE layer index from 0), not the model's layer index. The metrics also give the
time spent computing the expert FFNs, per sending attention rank (`tandem_expert_compute_seconds_total{source_rank}`
and `tandem_expert_computed_requests_total`), for profiling a step across the services.

Placement changes (expert load balancing): LoadExperts(placement N+1) builds this server's banks of version
N+1 beside the ones serving -- experts it already holds are copied from memory, only the others are read from
the checkpoint -- while the data plane keeps serving; requests name their version, so both serve until
UnloadExperts(keep_version) frees every other version. A failed load leaves the serving versions untouched.

SIGTERM/SIGINT: health NOT_SERVING, stop serving the plane, a last heartbeat with is_ready false, a last flush
of the statistics, then the gRPC server stops within `grace_s`; exit code 0. A server that cannot join the
plane (or is refused by the controller) exits with 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tandem.cluster.config import ConfigError, add_config_flags, build_config, setting
from tandem.cluster.placement_proto import placement_from_proto
from tandem.cluster.signals import stop_on_signals
from tandem.eplb.stats import ExpertLoadRecorder, connect
from tandem.kernels import library
from tandem.model.checkpoint import Checkpoint, CheckpointError
from tandem.model.loading import expert_key
from tandem.moe.placement import Placement
from tandem.transport import DataPlane, ExpertWorker, Roles
from tandem.transport.expert_parallel import load_server_experts, moe_layer_ids, restage_server_experts
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc
from tandem.v1 import expert_pb2 as pb
from tandem.v1 import expert_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = "expert"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertServer"].full_name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RPC_TIMEOUT_S = 5.0  # each call to the controller once it is up


@dataclass(slots=True, frozen=True)
class ExpertServerConfig:
    """An expert server: the routed experts of its placement slots, served over the data plane."""

    controller: str = setting(help="host:port of the controller's gRPC server")
    model_dir: str = setting(help="Hugging Face-layout checkpoint directory; only this server's experts are read")
    host: str = setting("0.0.0.0", help="address the gRPC server binds")
    port: int = setting(50060, help="gRPC port (0 = any free port)")
    advertise_host: str = setting("", help="host the other services reach this server at, as registered with "
                                           "the controller (empty: host, or 127.0.0.1 when host is a wildcard)")
    node: str = setting("", help="the machine (Kubernetes node) this server runs on, sent at registration: a "
                                 "controller that spreads expert servers over several nodes gives one node's "
                                 "servers one block of indices (empty: this host's name)")
    # load statistics
    redis_url: str = setting("", help="Redis for the expert-load statistics, e.g. redis://127.0.0.1:6379/0 "
                                      "(empty: statistics off)")
    model_name: str = setting("", help="model name in the statistics' Redis keys (empty: the model directory's "
                                       "name)")
    stats_window_s: float = setting(10.0, help="time window of the Redis counters, in seconds")
    stats_retention_s: float = setting(3600.0, help="how long Redis keeps a window's counters, in seconds")
    stats_flush_interval_s: float = setting(1.0, help="how often the counts are sent to Redis, in seconds")
    # compute and data plane
    dtype: str = setting("float32", help="dtype of the expert weights", choices=tuple(sorted(DTYPES)))
    device: str = setting("cpu", help="where the experts run", choices=("cpu", "cuda"))
    timeout_s: float = setting(30.0, help="data-plane timeout of one request's exchange once it started")
    join_timeout_s: float = setting(300.0, help="how long to wait for every rank to join the data plane")
    startup_timeout_s: float = setting(60.0, help="how long to wait for the controller at start")
    grace_s: float = setting(5.0, help="seconds in-flight gRPC calls get to finish at shutdown")
    metrics_port: int = setting(0, help="Prometheus metrics HTTP port (0 = off)")

    def __post_init__(self) -> None:
        for name in ("controller", "model_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: empty")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: {getattr(self, name)} is not a port number (0 .. 65535)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of cpu, cuda")
        for name in ("stats_window_s", "stats_retention_s", "stats_flush_interval_s", "timeout_s", "join_timeout_s",
                     "startup_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s: {self.grace_s} is negative")


class PlacementChangeError(RuntimeError):
    """LoadExperts or UnloadExperts cannot be done in the server's state (the message says why)."""


class TokenCounts:
    """Tokens each logical expert received, per placement row, since start; thread-safe."""

    def __init__(self, num_rows: int, num_logical: int):
        self._lock = threading.Lock()
        self._counts = torch.zeros(num_rows, num_logical, dtype=torch.int64)

    def add(self, row: int, counts: torch.Tensor) -> None:
        with self._lock:
            self._counts[row] += counts

    def snapshot(self) -> torch.Tensor:
        """[rows, num_logical] int64."""
        with self._lock:
            return self._counts.clone()


class ExpertServerServicer(pb_grpc.ExpertServerServicer):
    """Translates the ExpertServer API to the server's state."""

    def __init__(self, server: "ExpertServer"):
        self.server = server

    def LoadExperts(self, request, context):
        try:
            num_read = self.server.stage(request.placement)
        except PlacementChangeError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"LoadExperts: {e}")
        except (ValueError, CheckpointError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"LoadExperts: {e}")
        return pb.LoadExpertsResponse(num_loaded_experts=num_read)

    def UnloadExperts(self, request, context):
        try:
            freed = self.server.keep_only(request.keep_version)
        except PlacementChangeError as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"UnloadExperts: {e}")
        return pb.UnloadExpertsResponse(num_unloaded_experts=freed)

    def GetStats(self, request, context):
        s = self.server
        versions = s.worker.versions if s.worker is not None else [] if s.placement is None else [s.placement.version]
        rows = [] if s.counts is None else s.counts.snapshot().tolist()
        recorder = s.recorder
        return pb.ExpertStats(placement_versions=versions,
                              layers=[pb.LayerTokenCounts(layer=row, num_tokens_per_expert=counts)
                                      for row, counts in enumerate(rows)],
                              is_redis_connected=recorder is not None and recorder.is_connected,
                              num_failed_flushes=0 if recorder is None else recorder.num_failed_flushes)


class _ExpertMetrics:
    """Prometheus metrics read from the server's state at scrape time."""

    def __init__(self, server: "ExpertServer"):
        self.server = server

    def collect(self):
        tokens = CounterMetricFamily("tandem_expert_tokens", "Tokens each logical expert received on this server",
                                     labels=["layer", "expert"])
        if self.server.counts is not None:
            for row, counts in enumerate(self.server.counts.snapshot().tolist()):
                for expert, n in enumerate(counts):
                    if n:
                        tokens.add_metric([str(row), str(expert)], n)
        yield tokens
        yield GaugeMetricFamily("tandem_expert_serving", "1 while the server serves the data plane",
                                value=float(self.server.is_ready))
        if self.server.recorder is not None:
            yield CounterMetricFamily("tandem_expert_stats_failed_flushes", "Flushes to Redis that failed",
                                      value=self.server.recorder.num_failed_flushes)
        worker = self.server.worker
        if worker is not None:
            seconds = CounterMetricFamily("tandem_expert_compute_seconds", "Seconds spent running expert FFNs, by "
                                          "the data-plane rank of the attention worker that sent the tokens",
                                          labels=["source_rank"])
            requests = CounterMetricFamily("tandem_expert_computed_requests", "Expert requests computed, by the "
                                           "data-plane rank of the attention worker that sent them",
                                           labels=["source_rank"])
            for rank in sorted(worker.compute_seconds):
                seconds.add_metric([str(rank)], worker.compute_seconds[rank])
                requests.add_metric([str(rank)], worker.num_computed[rank])
            yield seconds
            yield requests


class ExpertServer:
    """One expert server's gRPC server, controller session, experts, data plane and statistics."""

    def __init__(self, config: ExpertServerConfig):
        if not Path(config.model_dir).is_dir():
            raise ConfigError(f"model_dir: {config.model_dir} is not a directory")
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda, but no CUDA device is available")
        self.config = config
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="expert-server"))
        pb_grpc.add_ExpertServerServicer_to_server(ExpertServerServicer(self), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {config.host}:{config.port}")
        host = config.advertise_host or (config.host if config.host not in ("0.0.0.0", "::", "[::]") else "127.0.0.1")
        self.address = f"{host}:{self.port}"
        self.channel = grpc.insecure_channel(config.controller)
        self.controller = cpb_grpc.ControllerStub(self.channel)
        self.node = config.node or socket.gethostname()  # sent at registration
        # filled in by start()
        self.member: cpb.Member | None = None
        self.placement: Placement | None = None  # the newest version held
        self._placements: dict[int, Placement] = {}  # every version held (the serving one and a staged one)
        self.slots_per_server = 0
        self._stage_lock = threading.Lock()  # one placement change at a time
        self.counts: TokenCounts | None = None
        self.recorder: ExpertLoadRecorder | None = None
        self.plane: DataPlane | None = None
        self.worker: ExpertWorker | None = None  # once the plane is joined
        self._row_of_layer: dict[int, int] = {}
        self.is_ready = False  # experts loaded, plane joined, not shutting down
        self.done = threading.Event()  # set by a signal, or by a fatal error (then `error` says which)
        self.error: str | None = None
        self._stopping = threading.Event()
        self._metrics_http = None
        self._set_health(False)

    def start(self) -> "ExpertServer":
        """Register, load this server's experts and start joining the plane; returns before the plane is joined."""
        config = self.config
        self.server.start()
        if config.metrics_port:
            registry = CollectorRegistry()
            registry.register(_ExpertMetrics(self))
            self._metrics_http, _ = start_http_server(config.metrics_port, addr=config.host, registry=registry)
        reply = self.controller.Register(cpb.RegisterRequest(role=cpb.ROLE_EXPERT, address=self.address,
                                                             node=self.node),
                                         timeout=config.startup_timeout_s, wait_for_ready=True)
        self.member = reply.member
        log.info("registered as expert server %d (rank %d, %s) at %s on node %s", self.member.index,
                 self.member.rank, self.member.member_id, self.address, self.node)
        threading.Thread(target=self._heartbeat, args=(reply.heartbeat_interval_ms / 1000,), daemon=True,
                         name="heartbeat").start()
        proto = self.controller.GetPlacement(cpb.GetPlacementRequest(), timeout=RPC_TIMEOUT_S)
        placement = placement_from_proto(proto)
        roles = self._roles(reply.data_plane, placement, proto.num_slots_per_server)
        banks, phy2log = self._load_experts(placement, proto.num_slots_per_server)
        self._row_of_layer = {layer: row for row, layer in enumerate(banks)}
        self.counts = TokenCounts(placement.num_layers, placement.num_logical)
        if config.redis_url:
            model = config.model_name or Path(config.model_dir).resolve().name
            self.recorder = ExpertLoadRecorder(connect(config.redis_url), model, config.stats_window_s,
                                               config.stats_retention_s)
            self.recorder.start(config.stats_flush_interval_s)
        self.placement, self._placements, self.slots_per_server = placement, {placement.version: placement}, \
            proto.num_slots_per_server
        threading.Thread(target=self._serve_plane, args=(reply.data_plane, roles, banks, phy2log), daemon=True,
                         name="data-plane").start()
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, stop serving the plane, tell the controller, flush the statistics, stop gRPC."""
        self._stopping.set()
        self.is_ready = False
        self.health.enter_graceful_shutdown()
        if self.member is not None:
            try:
                self.controller.Heartbeat(cpb.HeartbeatRequest(member_id=self.member.member_id, is_ready=False),
                                          timeout=1.0)
            except grpc.RpcError as e:
                log.info("last heartbeat not delivered: %s", e.details())
        if self.recorder is not None:
            self.recorder.stop()
        self.server.stop(self.config.grace_s if grace_s is None else grace_s).wait()
        self.channel.close()
        # the plane's groups stay: the worker's receive threads may still be blocked in them (destroying a group
        # under a pending receive can hang); the process's exit closes the connections, which the peers see
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def _roles(self, data_plane: cpb.DataPlane, placement: Placement, slots_per_server: int) -> Roles:
        """The plane's shape from the world size and the placement; checks this member's rank fits it."""
        num_servers, rest = divmod(placement.num_physical, slots_per_server) if slots_per_server else (0, 1)
        if rest or num_servers < 1:
            raise ValueError(f"placement of {placement.num_physical} slots does not split into servers of "
                             f"{slots_per_server} slots")
        roles = Roles(num_attention=data_plane.world_size - num_servers, num_expert_servers=num_servers)
        if self.member.rank != roles.expert_rank(self.member.index):
            raise ValueError(f"the controller gave expert server {self.member.index} rank {self.member.rank}, "
                             f"but a world of {roles} puts it at rank {roles.expert_rank(self.member.index)}")
        return roles

    def _load_experts(self, placement: Placement, slots_per_server: int):
        ckpt = Checkpoint(self.config.model_dir)
        layers = moe_layer_ids(ckpt.config)
        if len(layers) != placement.num_layers:
            raise ValueError(f"placement has {placement.num_layers} MoE layers, {self.config.model_dir} has "
                             f"{len(layers)}")
        # a checkpoint without MTP weights (transformers writes none) serves the main layers' rows only
        main = moe_layer_ids(ckpt.config, num_mtp_layers=0)
        num_mtp = sum(ckpt.has(expert_key(layer, 0, "gate_proj")) for layer in layers[len(main):])
        if self._device().type == "cpu":
            library.load()  # the experts run in its kernel
        banks, phy2log = load_server_experts(ckpt, placement, self.member.index, slots_per_server, num_mtp,
                                             dtype=DTYPES[self.config.dtype], device=self._device())
        log.info("loaded %d slots x %d MoE layers (placement version %d) from %s; %d banks packed for the CPU "
                 "kernels", slots_per_server, len(banks), placement.version, self.config.model_dir,
                 sum(bank.runs_in_kernel for bank in banks.values()))
        return banks, phy2log

    def _device(self) -> torch.device:
        if self.config.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _serve_plane(self, data_plane: cpb.DataPlane, roles: Roles, banks, phy2log) -> None:
        log.info("joining the data plane at %s:%d as rank %d of %d (%s)", data_plane.store_host,
                 data_plane.store_port, self.member.rank, data_plane.world_size, data_plane.backend)
        try:
            self.plane = DataPlane.join(data_plane.store_host, data_plane.store_port, self.member.rank,
                                        data_plane.world_size, data_plane.backend, self.config.join_timeout_s,
                                        roles=roles, device=self._device())
        except (RuntimeError, ValueError) as e:  # torch.distributed errors are RuntimeErrors
            self.fail(f"cannot join the data plane: {e}")
            return
        worker = ExpertWorker(self.plane, banks, phy2log, self.placement.num_logical, on_tokens=self._on_tokens,
                              timeout_s=self.config.timeout_s, version=self.placement.version)
        self.worker = worker
        if self._stopping.is_set():
            return
        self.is_ready = True
        self._set_health(True)
        log.info("serving %d attention ranks", roles.num_attention)
        worker.serve_forever(self._stopping)
        if not self._stopping.is_set():
            log.warning("every attention rank has left the data plane (%s); no longer serving",
                        worker.failed_peers or "all sent their shutdown")
            self.is_ready = False
            self._set_health(False)

    def stage(self, proto: cpb.Placement) -> int:
        """Load this server's experts of placement `proto` beside the serving ones; returns experts read."""
        worker = self.worker
        if worker is None or not self.is_ready:
            raise PlacementChangeError("the server is not serving yet (or shutting down)")
        current = self.placement
        placement = placement_from_proto(proto)
        if placement.phy2log.shape != current.phy2log.shape or placement.num_logical != current.num_logical:
            raise ValueError(f"placement version {placement.version} has shape {tuple(placement.phy2log.shape)} "
                             f"of {placement.num_logical} experts; this deployment's is "
                             f"{tuple(current.phy2log.shape)} of {current.num_logical}")
        if proto.num_slots_per_server != self.slots_per_server:
            raise ValueError(f"placement version {placement.version} has {proto.num_slots_per_server} slots per "
                             f"server; this server has {self.slots_per_server}")
        with self._stage_lock:
            held = worker.versions
            if placement.version <= held[0] or (placement.version in held and placement.version != held[-1]):
                raise PlacementChangeError(f"placement version {placement.version} cannot be staged: this server "
                                           f"holds versions {held}")
            if placement.version in held:  # staged before, then abandoned (the controller's staging failed)
                worker.drop_version(placement.version)
                del self._placements[placement.version]
                self.placement = self._placements[max(self._placements)]
                log.info("dropping the abandoned staging of placement version %d", placement.version)
            banks, phy2log, num_read = restage_server_experts(
                Checkpoint(self.config.model_dir), placement, self.member.index, self.slots_per_server,
                worker.banks(), worker.phy2log(), dtype=DTYPES[self.config.dtype], device=self._device())
            worker.add_version(placement.version, banks, phy2log)
            self._placements[placement.version] = placement
            self.placement = placement
        log.info("placement version %d staged beside %s: %d experts read from the checkpoint, the rest copied",
                 placement.version, worker.versions[:-1], num_read)
        return num_read

    def keep_only(self, version: int) -> int:
        """Free every placement version but `version`; returns how many were freed."""
        worker = self.worker
        if worker is None:
            raise PlacementChangeError("the server is not serving yet")
        with self._stage_lock:
            try:
                freed = worker.keep_only(version)
            except KeyError as e:
                raise PlacementChangeError(str(e.args[0])) from None
            self._placements = {version: self._placements[version]}
            self.placement = self._placements[version]
        log.info("serving placement version %d only (%d other version(s) freed)", version, freed)
        return freed

    def _on_tokens(self, layer: int, counts: torch.Tensor) -> None:
        row = self._row_of_layer[layer]
        self.counts.add(row, counts)
        if self.recorder is not None:
            self.recorder.add(row, counts)

    def _heartbeat(self, interval_s: float) -> None:
        is_reachable = True
        while not self._stopping.wait(interval_s):
            try:
                self.controller.Heartbeat(
                    cpb.HeartbeatRequest(member_id=self.member.member_id, is_ready=self.is_ready),
                    timeout=RPC_TIMEOUT_S)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    self._register_again()
                elif is_reachable:
                    log.warning("controller unreachable (%s); still serving, retrying", e.details())
                is_reachable = False
                continue
            if not is_reachable:
                log.info("controller reachable again")
            is_reachable = True

    def _register_again(self) -> None:
        """The controller forgot this member (it restarted): register again under the same address."""
        try:
            member = self.controller.Register(cpb.RegisterRequest(role=cpb.ROLE_EXPERT, address=self.address,
                                                                  node=self.node),
                                              timeout=RPC_TIMEOUT_S).member
        except grpc.RpcError as e:
            log.warning("registering again failed: %s", e.details())
            return
        if (member.index, member.rank) != (self.member.index, self.member.rank):
            log.error("registered again as expert server %d (rank %d), but this process holds server %d's experts "
                      "at rank %d: restart it", member.index, member.rank, self.member.index, self.member.rank)
        self.member = member

    def fail(self, message: str) -> None:
        log.error("%s", message)
        self.error = message
        self.done.set()

    def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)


def serve(config: ExpertServerConfig) -> int:
    """Run until SIGTERM or SIGINT (exit code 0) or a fatal error (1), shutting down gracefully."""
    server = ExpertServer(config)
    with stop_on_signals(server.done):
        try:
            server.start()
        except grpc.RpcError as e:  # refused by the controller (role full, bad request) or it never answered
            server.fail(f"controller {config.controller}: {e.code().name}: {e.details()}")
        except BaseException:
            server.stop(0)
            raise
        server.done.wait()
        log.info("expert server shutting down")
        server.stop()
    return 1 if server.error else 0


def add_expert_parser(serve_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`serve expert`: every ExpertServerConfig field as a flag."""
    p = serve_sub.add_parser(SERVICE, help="routed experts of this server's placement slots, over the data plane",
                             description=_description())
    add_config_flags(p, ExpertServerConfig, SERVICE)
    p.set_defaults(func=_cmd_serve)
    return p


def _description() -> str:
    return ("Run an expert server: registers with the controller, loads the routed experts of its placement "
            "slots, serves them to the attention workers over the data plane and counts the tokens each expert "
            "receives (in Redis with --redis-url). Settings come from --config YAML < environment "
            "(TANDEM_EXPERT_<FIELD>) < flags.")


def _cmd_serve(args: argparse.Namespace) -> int:
    return serve(build_config(ExpertServerConfig, SERVICE, args, os.environ))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem serve expert", description=_description())
    add_config_flags(parser, ExpertServerConfig, SERVICE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(build_config(ExpertServerConfig, SERVICE, args, os.environ))
    except ValueError as e:  # ConfigError, a checkpoint or placement this server cannot use
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
