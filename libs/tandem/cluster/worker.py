"""What the prefill and decode workers share: joining the cluster, the model with remote experts, and the handoff.

Start-up (`AttentionWorker`): register with the controller (role, gRPC address) -> data-plane rank, rendezvous
store, world size and the current expert placement -> on a background thread: load the model without its
routed experts, join the data plane (blocks until every rank of the deployment's fixed shape has joined),
route every MoE layer to the expert servers with the controller's placement (`use_remote_experts`), build the
engine and its `EngineRunner` -> ready, and acknowledge that placement version. A heartbeat thread reports
readiness to the controller meanwhile.

Placement changes: every heartbeat reply names the current placement version. When it is newer than the one
the worker routes with, the worker fetches it, switches every MoE layer to it between two engine steps
(`EngineRunner.run_between_steps`, so no step mixes versions; the expert servers hold both versions until
every worker has switched) and acknowledges it with AckPlacement. A version that cannot be fetched or
applied is retried at the next heartbeat; the old one keeps serving meanwhile.

A failed engine (the engine thread raised, e.g. an expert server died mid-exchange: gloo errors stick to the
connection, so nothing can heal it short of rebuilding the world) fails every open request with UNAVAILABLE
and ends the worker's service: `ready` clears, health turns NOT_SERVING, the heartbeats say is_ready=false
(the next one at once) and every later call gets UNAVAILABLE naming the cause, until the process is
restarted. The gateway picks only ready workers, so it stops sending requests here.

The prefill -> decode handoff's wire protocol, ordering and timeouts: tandem.transport.handoff.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass

import grpc
import torch

from tandem.cluster.config import ConfigError, setting
from tandem.cluster.metrics import EngineCollector, EngineTimings, ExchangeCollector, ServiceMetrics
from tandem.cluster.placement_proto import placement_from_proto
from tandem.cluster.signals import stop_on_signals
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.runner import EngineRunner
from tandem.engine.sampling import SamplingParams
from tandem.transport import DataPlane, Roles, TransportError, stop_expert_server
from tandem.transport.expert_dispatch import ExchangeTime, time_exchanges
from tandem.transport.expert_parallel import switch_placement, use_remote_experts
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(slots=True, frozen=True)
class WorkerConfig:
    """An attention worker (prefill or decode): where the controller is, the model, the engine's sizes."""

    model: str = setting(help="Hugging Face-layout checkpoint directory (routed experts are not loaded)")
    controller: str = setting("127.0.0.1:50050", help="host:port of the controller")
    host: str = setting("0.0.0.0", help="address the gRPC server binds")
    port: int = setting(0, help="gRPC port (0 = any free port)")
    advertise_host: str = setting("127.0.0.1", help="host the other services reach this worker at (registered "
                                                   "with the controller together with the bound port)")
    dtype: str = setting("float32", help="compute dtype", choices=tuple(sorted(DTYPES)))
    device: str = setting("cpu", help="where the engine runs", choices=("cpu", "cuda"))
    max_num_seqs: int = setting(64, help="sequences the engine batches per step at most")
    max_num_batched_tokens: int = setting(2048, help="prompt tokens per step at most (chunked prefill)")
    block_size: int = setting(16, help="tokens per KV-cache block")
    num_kv_blocks: int | None = setting(None, help="KV-cache blocks (unset: room for max_num_seqs full-length "
                                                   "sequences)")
    num_speculative_tokens: int | None = setting(None, help="MTP drafts per step at most (unset: the model's MTP "
                                                            "depth); requests ask for fewer")
    max_queued: int = setting(256, help="requests held at once (waiting, running or waiting for their KV)")
    kv_timeout_s: float = setting(30.0, help="how long a KV handoff may take before the request fails with "
                                             "UNAVAILABLE")
    expert_timeout_s: float = setting(30.0, help="how long one MoE layer's expert exchange may take")
    join_timeout_s: float = setting(300.0, help="how long to wait for every rank to join the data plane")
    grace_s: float = setting(5.0, help="seconds in-flight requests get to finish at shutdown")
    metrics_port: int = setting(0, help="Prometheus metrics HTTP port (0 = off)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: empty")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: {getattr(self, name)} is not a port number (0 .. 65535)")
        if ":" not in self.controller:
            raise ConfigError(f"controller: {self.controller!r} is not host:port")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queued"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ConfigError(f"num_kv_blocks: {self.num_kv_blocks} must be positive")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ConfigError(f"num_speculative_tokens: {self.num_speculative_tokens} is negative")
        for name in ("kv_timeout_s", "expert_timeout_s", "join_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s: {self.grace_s} is negative")


def sampling_params(sampling) -> SamplingParams:
    """tandem.v1.SamplingParams -> the engine's; raises SamplingError naming a bad field."""
    return SamplingParams(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k, seed=sampling.seed if sampling.HasField("seed") else None,
                          stop_token_ids=tuple(sampling.stop_token_ids),
                          allowed_first_tokens=tuple(sampling.allowed_first_tokens))


class AttentionWorker:
    """A prefill or decode worker's membership and engine: `register`, then `start` loads and joins in the
    background; `runner`, `plane` and `exchange_time` are set once `ready` is. Both roles run the same engine;
    the prefill worker's requests are prefill-only. `failure` is why it does not serve: its start-up or its
    engine failed (`ready` stays clear for good)."""

    def __init__(self, config: WorkerConfig, role: int):
        self.config = config
        self.role = role
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.runner: EngineRunner | None = None
        self.plane: DataPlane | None = None
        self.exchange_time: ExchangeTime | None = None
        self.member: cpb.Member | None = None
        self._stopping = threading.Event()
        self._beat = threading.Event()  # wakes the heartbeat thread (to stop, or to report a failure at once)
        self._on_failure = None
        self.model = None  # with remote experts, once started
        self.placement_version = 0  # the version the MoE layers route with, once started
        self._following = threading.Lock()  # one placement switch at a time
        self._channel = grpc.insecure_channel(config.controller)
        self._controller = cpb_grpc.ControllerStub(self._channel)

    def register(self, address: str, timeout_s: float = 60.0) -> cpb.RegisterResponse:
        """Join the cluster (waiting up to timeout_s for the controller) and fetch the current placement."""
        reply = self._controller.Register(cpb.RegisterRequest(role=self.role, address=address), timeout=timeout_s,
                                          wait_for_ready=True)
        self.member, self._registration = reply.member, reply
        self.placement_proto = self._controller.GetPlacement(cpb.GetPlacementRequest(version=0), timeout=timeout_s)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        log.info("registered as %s (index %d, data-plane rank %d of %d); placement version %d", reply.member.member_id,
                 reply.member.index, reply.member.rank, reply.data_plane.world_size, self.placement_proto.version)
        return reply

    def start(self, on_ready, on_failure=None, on_step=None) -> None:
        """Load, join and build the engine on a background thread; `on_ready()` runs once it serves,
        `on_failure()` once if its engine fails later, `on_step(seconds)` after every engine step (on the engine
        thread: keep it cheap)."""
        self._on_failure = on_failure
        threading.Thread(target=self._start, args=(on_ready, on_step), name="worker-start", daemon=True).start()

    def _start(self, on_ready, on_step) -> None:
        from tandem.model.config import ModelConfig
        from tandem.model.loading import load_model

        config, dp = self.config, self._registration.data_plane
        try:
            model = load_model(config.model, dtype=DTYPES[config.dtype], device=config.device,
                               load_routed_experts=False)
            placement = placement_from_proto(self.placement_proto)
            slots = self.placement_proto.num_slots_per_server
            num_servers = placement.num_physical // slots
            roles = Roles(dp.world_size - num_servers, num_servers)
            self.plane = DataPlane.join(dp.store_host, dp.store_port, self.member.rank, dp.world_size, dp.backend,
                                        timeout_s=config.join_timeout_s, roles=roles,
                                        device=config.device if dp.backend == "gloo" else None)
            use_remote_experts(model, self.plane, placement, slots, config.expert_timeout_s)
            self.model, self.placement_version = model, placement.version
            self.exchange_time = time_exchanges(model)
            spec = config.num_speculative_tokens
            if spec is None:
                spec = ModelConfig.from_file(config.model).num_nextn_predict_layers
            engine = Engine(model, EngineConfig(max_num_seqs=config.max_num_seqs,
                                                max_num_batched_tokens=config.max_num_batched_tokens,
                                                block_size=config.block_size, num_kv_blocks=config.num_kv_blocks,
                                                num_speculative_tokens=spec))
            self.runner = EngineRunner(engine, config.max_queued, stream_timeout_s=None, on_step=on_step,
                                       on_failure=self._engine_failed)
        except BaseException as e:  # noqa: BLE001 - reported by health (never SERVING) and the log
            log.exception("worker start-up failed")
            self.failure = e
            return
        self.ready.set()
        log.info("data-plane rank %d joined (%d ranks, %s); serving with placement version %d", self.member.rank,
                 dp.world_size, dp.backend, self.placement_version)
        self._ack(self.placement_version)
        on_ready()

    def _engine_failed(self, error: BaseException) -> None:
        """The runner's on_failure hook (engine thread): its open requests have failed; stop serving for good."""
        self.failure = error
        self.ready.clear()
        log.error("%s worker: the engine failed (%r); every request in flight failed with UNAVAILABLE, and the "
                  "worker serves no more (health NOT_SERVING, not ready for the controller) until it is restarted",
                  role_name(self.role), error)
        self._beat.set()
        if self._on_failure is not None:
            self._on_failure()

    def not_serving_reason(self) -> str:
        """Why calls get UNAVAILABLE while `ready` is clear, for their status message."""
        name = role_name(self.role)
        if self.failure is not None:
            what = "engine" if self.runner is not None else "start-up"
            return f"the {name} worker's {what} failed ({self.failure!r}); it serves no more until restarted"
        return f"the {name} worker is starting or shutting down"

    def _heartbeat(self) -> None:
        interval = max(self._registration.heartbeat_interval_ms, 50) / 1000
        while True:
            self._beat.wait(interval)
            self._beat.clear()
            if self._stopping.is_set():
                return
            try:
                reply = self._controller.Heartbeat(cpb.HeartbeatRequest(member_id=self.member.member_id,
                                                                        is_ready=self.ready.is_set()),
                                                   timeout=interval * 3)
            except grpc.RpcError as e:
                log.warning("heartbeat failed: %s %s", e.code().name, e.details())
                continue
            if self.ready.is_set() and reply.placement_version > self.placement_version \
                    and not self._following.locked():
                threading.Thread(target=self._follow_placement, args=(reply.placement_version,),
                                 name="placement-switch", daemon=True).start()

    def _follow_placement(self, version: int) -> None:
        """Switch the MoE layers to placement `version` between two engine steps, then acknowledge it."""
        with self._following:
            if version <= self.placement_version:
                return
            try:
                proto = self._controller.GetPlacement(cpb.GetPlacementRequest(version=version), timeout=10)
                placement = placement_from_proto(proto)
                self.runner.run_between_steps(lambda: switch_placement(self.model, placement)).result(timeout=60)
            except Exception as e:  # noqa: BLE001 - the old placement keeps serving; retried at the next heartbeat
                log.warning("could not switch to placement version %d (still on %d): %r", version,
                            self.placement_version, e)
                return
            self.placement_version = version
            log.info("switched to placement version %d", version)
            self._ack(version)

    def _ack(self, version: int) -> None:
        try:
            self._controller.AckPlacement(cpb.AckPlacementRequest(member_id=self.member.member_id, version=version),
                                          timeout=5)
        except grpc.RpcError as e:  # the controller then waits for the ack until its timeout; serving goes on
            log.warning("acknowledging placement version %d failed: %s %s", version, e.code().name, e.details())

    def stop(self, grace_s: float) -> None:
        """Stop heartbeating ready, let open requests finish within grace_s, release the expert servers."""
        self.ready.clear()
        try:
            self._controller.Heartbeat(cpb.HeartbeatRequest(member_id=self.member.member_id, is_ready=False),
                                       timeout=1.0)
        except grpc.RpcError:
            pass  # the controller may be gone first; it then learns from the missing heartbeats
        self._stopping.set()
        self._beat.set()
        if self.runner is not None:
            self.runner.close(grace_s)
        if self.plane is not None:
            for i in range(self.plane.roles.num_expert_servers):
                try:
                    stop_expert_server(self.plane, self.plane.roles.expert_rank(i), timeout_s=2.0)
                except TransportError as e:
                    log.warning("could not release expert server %d: %s", i, e)
        self._channel.close()


class WorkerServer:
    """One attention worker's gRPC server: its servicer, standard health (NOT_SERVING until the engine serves,
    once the engine failed, and while shutting down) and reflection, registered with the controller under the
    bound port; with a metrics port, its Prometheus metrics (the servicer's calls, its engine's queue, KV blocks,
    speculation and step times, and its time in expert exchanges)."""

    SPARE_RPCS = 8  # health checks, GetLoad, Cancel and reflection beyond the requests in flight

    def __init__(self, config: WorkerConfig, role: int, service_name: str, add_servicer):
        from concurrent import futures

        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.config = config
        self.worker = AttentionWorker(config, role)
        self.metrics = ServiceMetrics()
        self.metrics.registry.register(EngineCollector(lambda: self.worker.runner))
        self.metrics.registry.register(ExchangeCollector(lambda: self.worker.exchange_time))
        self.timings = EngineTimings(self.metrics, phase=role_name(role))
        self.health = health.HealthServicer()
        self._names = ("", service_name)
        self._serving = health_pb2.HealthCheckResponse.SERVING
        self._not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        workers = config.max_queued + self.SPARE_RPCS
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=role_name(role)),
                                  maximum_concurrent_rpcs=workers)
        self.servicer = add_servicer(self.server, self.worker, self.metrics)  # has close(), called at shutdown
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (service_name, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server)
        self._set_health(self._not_serving)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {config.host}:{config.port}")

    def start(self) -> "WorkerServer":
        """Serve (NOT_SERVING), register, then load and join in the background; SERVING once the engine runs."""
        if self.config.metrics_port:
            self.metrics.serve(self.config.host, self.config.metrics_port)
        self.server.start()
        self.worker.register(f"{self.config.advertise_host}:{self.port}")
        self.worker.start(on_ready=lambda: self._set_health(self._serving),
                          on_failure=lambda: self._set_health(self._not_serving), on_step=self.timings.observe)
        log.info("%s listening on port %d", role_name(self.worker.role), self.port)
        return self

    def _set_health(self, status) -> None:
        for name in self._names:
            self.health.set(name, status)

    def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, let open requests finish within the grace period, release the peers, stop."""
        self.health.enter_graceful_shutdown()
        self.worker.stop(self.config.grace_s if grace_s is None else grace_s)
        self.servicer.close()
        self.server.stop(1.0).wait()  # time for the handlers to send their last message
        self.metrics.stop()


def role_name(role: int) -> str:
    return cpb.Role.Name(role).removeprefix("ROLE_").lower()


def serve_worker(config: WorkerConfig, role: int, service_name: str, add_servicer) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully and exit the process with status 0."""
    server = WorkerServer(config, role, service_name, add_servicer).start()
    with stop_on_signals(threading.Event()) as stop:
        stop.wait()
        log.info("%s shutting down", role_name(role))
        server.stop()
    # gloo cannot withdraw a posted receive (a decode worker's, for a handoff that never came), and one still
    # posted aborts the interpreter's exit and destroy_process_group alike; everything this process owns is
    # shut down by now, so it leaves without running those destructors
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
