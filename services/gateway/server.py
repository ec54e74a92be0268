"""The gateway process: `tandem serve gateway`.

config -> tokenizer and backend -> servicer -> health -> serve. The backend is the colocated engine in-process
on an `EngineRunner`, or with --controller the prefill and decode workers that controller lists
(`WorkerBackend`: the gateway then loads only the model's config and tokenizer, and GetModelInfo asks the
controller for the cluster shape: UNAVAILABLE when it does not answer within 2 s). Standard gRPC health
(NOT_SERVING until the model is loaded and the server started, and while shutting down) and server
reflection; SIGTERM/SIGINT shut it down gracefully: health NOT_SERVING, no new requests, in-flight ones get
`grace_s` to finish and are then cancelled (FINISH_REASON_CANCELLED). With a metrics port, Prometheus metrics
(tandem.cluster.metrics) are served over HTTP: the calls as clients see them, and the queue, KV blocks,
speculative counters and step times (phase "colocated") of the colocated engine, or the queue and draft counts
of the requests on the workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.cluster.config import ConfigError, add_config_flags, build_config, setting
from tandem.cluster.metrics import EngineCollector, EngineTimings, ServiceMetrics, WorkerBackendCollector
from tandem.cluster.signals import stop_on_signals
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.runner import EngineRunner
from tandem.gateway.workers import WorkerBackend
from tandem.v1 import gateway_pb2 as pb
from tandem.v1 import gateway_pb2_grpc as pb_grpc

from services.gateway.servicer import Backend, GatewayServicer

log = logging.getLogger(__name__)
SERVICE = "gateway"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Gateway"].full_name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SPARE_RPCS = 8  # health checks, GetModelInfo and reflection beyond the streams a full queue holds


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    """The gateway: the public API in front of a colocated engine, or of the workers of a controller."""

    model: str = setting(help="Hugging Face-layout checkpoint directory (with tokenizer.json for text prompts)")
    controller: str = setting("", help="host:port of a controller: serve through its prefill and decode workers "
                                       "(empty: run the colocated engine in-process)")
    host: str = setting("0.0.0.0", help="address the gRPC server binds")
    port: int = setting(50051, help="gRPC port (0 = any free port)")
    max_queued: int = setting(256, help="requests admitted at once (waiting or running); beyond it "
                                        "RESOURCE_EXHAUSTED")
    num_speculative_tokens: int | None = setting(None, help="MTP drafts per step at most, the default for "
                                                            "requests with speculative_tokens = 0 (unset: the "
                                                            "model's MTP depth; 0 = off)")
    dtype: str = setting("float32", help="compute dtype", choices=tuple(sorted(DTYPES)))
    device: str = setting("cpu", help="where the engine runs", choices=("cpu", "cuda"))
    max_num_seqs: int = setting(64, help="sequences the engine batches per step at most")
    cuda_graphs: bool = setting(True, help="on cuda, replay decode steps from CUDA graphs where the model allows "
                                           "(bfloat16); false runs every step eagerly")
    compile_decode: bool = setting(False, help="on cpu, run decode steps from forwards compiled "
                                               "ahead of time, about 2.5x faster at batch 1, compiled at start-up "
                                               "(1-4 minutes on 2 cores, seconds once cached)")
    model_name: str = setting("", help="name reported by GetModelInfo (empty: the model directory's name)")
    grace_s: float = setting(10.0, help="seconds in-flight requests get to finish at shutdown")
    metrics_port: int = setting(0, help="Prometheus metrics HTTP port (0 = off)")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model: empty")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name}: {getattr(self, name)} is not a port number (0 .. 65535)")
        if self.controller and ":" not in self.controller:
            raise ConfigError(f"controller: {self.controller!r} is not host:port")
        for name in ("max_queued", "max_num_seqs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be positive")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ConfigError(f"num_speculative_tokens: {self.num_speculative_tokens} is negative")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of cpu, cuda")
        if self.grace_s < 0:
            raise ConfigError(f"grace_s: {self.grace_s} is negative")


def model_info(engine: Engine, name: str) -> pb.ModelInfo:
    """ModelInfo of a colocated engine: no workers or expert servers, so the cluster shape is all zeros."""
    c = engine.model.config
    return pb.ModelInfo(model_name=name, max_context_tokens=engine.max_model_len, vocab_size=c.vocab_size,
                        num_mtp_layers=len(engine.model.mtp_layers), num_routed_experts=c.n_routed_experts,
                        num_moe_layers=c.num_moe_layers, cluster=pb.ClusterShape())


def config_model_info(config, name: str) -> pb.ModelInfo:
    """ModelInfo from the model's ModelConfig alone, for a gateway in front of workers; its cluster shape is
    filled from the controller at each GetModelInfo (`WorkerBackend.cluster_shape`: the members registered)."""
    return pb.ModelInfo(model_name=name, max_context_tokens=config.max_position_embeddings,
                        vocab_size=config.vocab_size, num_mtp_layers=config.num_nextn_predict_layers,
                        num_routed_experts=config.n_routed_experts, num_moe_layers=config.num_moe_layers,
                        cluster=pb.ClusterShape())


def build_server(servicer: GatewayServicer, health_servicer: health.HealthServicer, address: str,
                 max_workers: int) -> tuple[grpc.Server, int]:
    """A gRPC server (not started) with the Gateway, health (NOT_SERVING) and reflection; (server, bound port).

    Each Generate stream holds a worker thread, so `max_workers` should cover the admission queue plus a few
    for health checks; calls beyond it get RESOURCE_EXHAUSTED from gRPC itself."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gateway"),
                         maximum_concurrent_rpcs=max_workers)
    pb_grpc.add_GatewayServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the gRPC port {address}")
    return server, port


class GatewayServer:
    """The backend, servicer, gRPC server and health of one gateway; `from_config` builds the backend too."""

    def __init__(self, runner: Backend, tokenizer, info: pb.ModelInfo, host: str = "0.0.0.0", port: int = 0,
                 grace_s: float = 10.0, metrics_port: int = 0):
        self.runner = runner
        self.grace_s = grace_s
        self.host, self.metrics_port = host, metrics_port
        self.metrics = ServiceMetrics()
        self.metrics.registry.register(EngineCollector(lambda: runner) if isinstance(runner, EngineRunner)
                                       else WorkerBackendCollector(runner))
        if isinstance(runner, EngineRunner):
            runner.on_step = EngineTimings(self.metrics, phase="colocated").observe
        self.health = health.HealthServicer()
        shape = None if isinstance(runner, EngineRunner) else runner.cluster_shape
        self.servicer = GatewayServicer(runner, tokenizer, info, self.metrics, cluster_shape=shape)
        self.server, self.port = build_server(self.servicer, self.health, f"{host}:{port}",
                                              runner.max_queued + SPARE_RPCS)

    @classmethod
    def from_config(cls, config: GatewayConfig) -> "GatewayServer":
        from tandem.model.config import ModelConfig
        from tandem.model.loading import load_model
        from tandem.model.tokenizer import load_tokenizer

        if not Path(config.model).is_dir():
            raise ConfigError(f"model: {config.model} is not a directory")
        model_config = ModelConfig.from_file(config.model)
        spec = config.num_speculative_tokens
        if spec is None:
            spec = model_config.num_nextn_predict_layers
        name = config.model_name or Path(config.model).resolve().name
        if config.controller:
            return cls(WorkerBackend(config.controller, config.max_queued, spec), load_tokenizer(config.model),
                       config_model_info(model_config, name), config.host, config.port, config.grace_s,
                       config.metrics_port)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda, but no CUDA device is available")
        model = load_model(config.model, dtype=DTYPES[config.dtype], device=config.device)
        # no tokenizer for the engine: the gateway detokenizes and matches stop strings itself
        engine = Engine(model, EngineConfig(max_num_seqs=config.max_num_seqs, num_speculative_tokens=spec,
                                            cuda_graphs=config.cuda_graphs,
                                            compile_decode=config.compile_decode))
        return cls(EngineRunner(engine, config.max_queued), load_tokenizer(config.model), model_info(engine, name),
                   config.host, config.port, config.grace_s, config.metrics_port)

    def start(self) -> "GatewayServer":
        if self.metrics_port:
            self.metrics.serve(self.host, self.metrics_port)
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("gateway serving on port %d", self.port)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING, refuse new requests, let in-flight ones finish within the grace period, cancel
        the rest (their streams end with FINISH_REASON_CANCELLED), then stop the server."""
        self.health.enter_graceful_shutdown()
        self.runner.close(self.grace_s if grace_s is None else grace_s)
        self.server.stop(1.0).wait()  # time for the handlers to send their last message
        self.metrics.stop()


def serve(config: GatewayConfig) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = GatewayServer.from_config(config).start()
    with stop_on_signals(threading.Event()) as stop:
        stop.wait()
        log.info("gateway shutting down")
        server.stop()
    return 0


def add_gateway_parser(serve_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`serve gateway`: every GatewayConfig field as a flag; TANDEM_GATEWAY_<FIELD> variables override YAML."""
    p = serve_sub.add_parser(SERVICE, help="the public gRPC API (tandem.v1.Gateway)",
                             description="Run the gateway: tokenizes, validates and admits requests and streams "
                                         "tokens back, from the colocated engine in-process or, with "
                                         "--controller, from that controller's prefill and decode workers. Settings "
                                         "come from --config YAML < environment (TANDEM_GATEWAY_<FIELD>) < flags.")
    add_config_flags(p, GatewayConfig, SERVICE)
    p.set_defaults(func=lambda args: serve(build_config(GatewayConfig, SERVICE, args, os.environ)))
    return p
