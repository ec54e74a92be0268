"""The shape of a Tandem deployment and the command line of each of its service processes.

The controller and the expert servers get the same Redis URL: the expert servers count expert load into it,
the controller re-plans the expert placement from it (on demand, `tandem eplb rebalance`, and every
`rebalance_interval_s` when that is set).

One description serves both ways of running a cluster on one machine: `tandem up` starts the services as
local processes that reach each other on 127.0.0.1, and `docker-compose.yml` (written by `tandem up
--print-compose`) runs the same services as containers that reach each other by service name. Only the
addresses differ; the services, flags, ports and environment are the same, which tests/unit/test_topology.py
checks against the committed compose file.

Ports: the controller and the gateway have their own; expert servers, prefill and decode workers take
consecutive ports from `service_port_base` (experts first); with `metrics_port_base` set, every service
exports Prometheus metrics on consecutive ports from it, in the order of `services()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

REDIS_SERVICE = "redis"
COMPOSE_IMAGE = "tandem:latest"
COMPOSE_MODEL_DIR = "/opt/tandem/models/tiny-code"
COMPOSE_REDIS_IMAGE = "redis:7-alpine"


@dataclass(slots=True, frozen=True)
class Topology:
    """How many of each role, the model, the ports, and where the expert statistics go."""

    model: str
    num_prefill: int = 1
    num_decode: int = 1
    num_expert_servers: int = 2
    controller_port: int = 50050
    store_port: int = 29500
    gateway_port: int = 50051
    service_port_base: int = 50060
    metrics_port_base: int = 9400  # 0: no metrics endpoints
    redis_url: str = ""  # empty: statistics (and expert load balancing) off
    rebalance_interval_s: float = 0.0  # the controller re-plans the expert placement this often; 0: on demand only
    num_speculative_tokens: int | None = None  # None: the model's MTP depth
    threads_per_service: int = 1  # OMP_NUM_THREADS of each process: they share the machine's cores
    extra_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("num_prefill", "num_decode", "num_expert_servers", "threads_per_service"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}: {getattr(self, name)} must be at least 1")
        if self.rebalance_interval_s < 0:
            raise ValueError(f"rebalance-interval-s: {self.rebalance_interval_s} is negative (0 = on demand only)")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ValueError(f"speculative-tokens: {self.num_speculative_tokens} is negative")
        for name in ("controller_port", "store_port", "gateway_port", "service_port_base"):
            if not 1 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name.replace('_', '-')}: {getattr(self, name)} is not a port number")
        if not 0 <= self.metrics_port_base <= 65535 - len(self.names()):
            raise ValueError(f"metrics-port-base: {self.metrics_port_base} leaves no room for "
                             f"{len(self.names())} metrics ports")
        ports = self.ports()
        if len(set(ports)) != len(ports):
            raise ValueError("ports overlap: " + ", ".join(str(p) for p in sorted(ports)))

    def names(self) -> list[str]:
        """Service names in start order: controller, expert servers, prefill, decode, gateway."""
        return (["controller"] + [f"expert-{i}" for i in range(self.num_expert_servers)]
                + [f"prefill-{i}" for i in range(self.num_prefill)] + [f"decode-{i}" for i in range(self.num_decode)]
                + ["gateway"])

    def grpc_port(self, name: str) -> int:
        if name == "controller":
            return self.controller_port
        if name == "gateway":
            return self.gateway_port
        pooled = [n for n in self.names() if n not in ("controller", "gateway")]
        return self.service_port_base + pooled.index(name)

    def metrics_port(self, name: str) -> int:
        return self.metrics_port_base + self.names().index(name) if self.metrics_port_base else 0

    def ports(self) -> list[int]:
        """Every port the deployment listens on (the data-plane store included)."""
        ports = [self.store_port] + [self.grpc_port(n) for n in self.names()]
        return ports + ([self.metrics_port(n) for n in self.names()] if self.metrics_port_base else [])


@dataclass(slots=True, frozen=True)
class ServiceSpec:
    """One service process: `tandem <args>` with `env` added to the environment."""

    name: str
    args: list[str]
    env: dict[str, str]
    grpc_port: int
    metrics_port: int


def services(topology: Topology, address_of: Callable[[str], str], bind_host: str,
             model_dir: str | None = None) -> list[ServiceSpec]:
    """The command line of every service, in start order.

    `address_of(name)` is the host other services reach service `name` at (its advertised address);
    `bind_host` the address each one binds; `model_dir` the checkpoint path inside the processes (default:
    the topology's model).
    """
    t = topology
    model = model_dir or t.model
    controller = f"{address_of('controller')}:{t.controller_port}"
    env = {"OMP_NUM_THREADS": str(t.threads_per_service), "PYTHONUNBUFFERED": "1", **t.extra_env}
    spec_flags = [] if t.num_speculative_tokens is None else ["--num-speculative-tokens",
                                                              str(t.num_speculative_tokens)]
    specs = []
    for name in t.names():
        role = name.split("-")[0]
        port, metrics = t.grpc_port(name), t.metrics_port(name)
        common = ["--host", bind_host, "--port", str(port), "--metrics-port", str(metrics)]
        if role == "controller":
            args = ["--model-dir", model, *common, "--store-host", address_of("controller"),
                    "--store-port", str(t.store_port), "--num-prefill", str(t.num_prefill),
                    "--num-decode", str(t.num_decode), "--num-expert-servers", str(t.num_expert_servers),
                    # the expert servers' Redis: the controller re-plans from their statistics
                    "--redis-url", t.redis_url, "--rebalance-interval-s", f"{t.rebalance_interval_s:g}"]
        elif role == "expert":
            args = ["--model-dir", model, "--controller", controller, *common, "--advertise-host", address_of(name),
                    "--redis-url", t.redis_url]
        elif role in ("prefill", "decode"):
            args = ["--model", model, "--controller", controller, *common, "--advertise-host", address_of(name),
                    *spec_flags]
        else:
            args = ["--model", model, "--controller", controller, *common, *spec_flags]
        specs.append(ServiceSpec(name, ["serve", role, *args], dict(env), port, metrics))
    return specs


def local_services(topology: Topology) -> list[ServiceSpec]:
    """Processes on this machine: everything on 127.0.0.1."""
    return services(topology, lambda _: "127.0.0.1", "127.0.0.1")


def compose_document(topology: Topology) -> dict:
    """The docker-compose document of the topology: one container per service from the `tandem` image (the
    bundled model inside it), plus Redis; containers reach each other by service name."""
    topology = replace(topology, redis_url=f"redis://{REDIS_SERVICE}:6379/0")
    specs = services(topology, lambda name: name, "0.0.0.0", model_dir=COMPOSE_MODEL_DIR)
    doc: dict = {"name": "tandem", "services": {
        REDIS_SERVICE: {"image": COMPOSE_REDIS_IMAGE, "command": ["redis-server", "--save", "", "--appendonly", "no"],
                        "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "2s", "retries": 30}}}}
    for spec in specs:
        # the launcher's start order: Redis, the controller, the pools, then the gateway
        after = ([REDIS_SERVICE] if spec.name == "controller" else
                 [s.name for s in specs if s.name not in ("controller", "gateway")] if spec.name == "gateway" else
                 ["controller"])
        depends = {name: {"condition": "service_healthy"} for name in after}
        service = {"image": COMPOSE_IMAGE, "build": ".", "command": spec.args, "environment": spec.env,
                   "depends_on": depends, "stop_grace_period": "15s",
                   "healthcheck": {"test": ["CMD", "tandem", "health", f"127.0.0.1:{spec.grpc_port}"],
                                   "interval": "5s", "timeout": "3s", "retries": 60}}
        if spec.name == "gateway":
            service["ports"] = [f"{spec.grpc_port}:{spec.grpc_port}"]
        doc["services"][spec.name] = service
    return doc

