"""`tandem up`: a whole cluster on this machine, as plain processes.

Start order: redis-server (unless a `--redis-url` is given), the controller, then the expert servers and the
prefill and decode workers together (they rendezvous on the controller's data plane, so none is ready before
all have started), then the gateway. Each service's own grpc.health.v1 must say SERVING before the cluster
counts as up; a service that exits before then stops the launch with the end of its log.

Children run in their own sessions, so Ctrl-C reaches only the launcher, which then stops them in reverse
order (SIGTERM, the services' graceful shutdown, SIGKILL after a grace period). A service that dies while the
cluster runs is reported with its log and takes the cluster down: half a cluster fails requests in confusing
ways. Logs: one file per service in `--log-dir`.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tqdm import tqdm

from tandem.cluster.topology import Topology, compose_document, local_services

log = logging.getLogger(__name__)
POLL_S = 0.25
LOG_TAIL_CHARS = 3000


class LaunchError(RuntimeError):
    """The cluster could not start (the message says which service and why, with the end of its log)."""


def listening_ports() -> range:
    """Where to pick ports for servers: below the kernel's ephemeral range. Outgoing connections take their
    source ports from that range (and bind(0) its port), so a free port picked there can be taken by one before
    the server meant to listen on it binds it ("Address already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux
        low = 32768
    return range(10000, low if low > 11000 else 32768)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now, from `listening_ports`."""
    return free_port_range(1)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def health_status(address: str, timeout_s: float = 1.0) -> int | None:
    """The grpc.health.v1 status of the server at `address`, or None when it does not answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        except grpc.RpcError:
            return None


@dataclass(slots=True)
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    grpc_port: int | None  # None: not a gRPC service (redis-server)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


class LocalCluster:
    """The processes of one local cluster; `start` brings it up, `stop` takes it down, both idempotently."""

    def __init__(self, topology: Topology, log_dir: Path, ready_timeout_s: float = 300.0,
                 show_progress: bool = True):
        self.topology = topology
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.show_progress = show_progress
        self.processes: list[Process] = []
        self._stopped = False

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.topology.gateway_port}"

    def start(self) -> "LocalCluster":
        busy = [p for p in self.topology.ports() if port_in_use(p)]
        if busy:
            raise LaunchError(f"port(s) {', '.join(map(str, busy))} already in use: stop what uses them or pick "
                              "other ports (--controller-port, --gateway-port, --store-port, --service-port-base, "
                              "--metrics-port-base, or --free-ports)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.topology.redis_url == "":
                self._start_redis()
            specs = {s.name: s for s in local_services(self.topology)}
            self._wait_healthy([self._spawn_service(specs["controller"])])
            pooled = [self._spawn_service(s) for n, s in specs.items() if n not in ("controller", "gateway")]
            self._wait_healthy(pooled)
            self._wait_healthy([self._spawn_service(specs["gateway"])])
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise LaunchError("redis-server is not installed (it holds the expert-load statistics): install it "
                              "(`make up` does, or `sudo apt-get install redis-server`), or pass --redis-url of "
                              "a running Redis")
        port = free_port()
        process = self._spawn("redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                        "--appendonly", "no"], {}, None)
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise LaunchError(f"redis-server did not start:\n{process.log_tail()}")
            time.sleep(0.1)
        self.topology = replace(self.topology, redis_url=f"redis://127.0.0.1:{port}/0")
        log.info("redis-server on port %d", port)

    def _spawn_service(self, spec) -> Process:
        return self._spawn(spec.name, [sys.executable, "-m", "tandem.cli", "-v", *spec.args], spec.env,
                           spec.grpc_port)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], grpc_port: int | None) -> Process:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w") as out:
            popen = subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        process = Process(name, popen, log_path, grpc_port)
        self.processes.append(process)
        log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return process

    def _wait_healthy(self, processes: list[Process]) -> None:
        pending = list(processes)
        deadline = time.monotonic() + self.ready_timeout_s
        with tqdm(total=len(pending), desc="waiting for " + ", ".join(p.name for p in pending), unit="service",
                  disable=not self.show_progress, leave=False) as bar:
            while pending:
                for p in list(pending):
                    if p.popen.poll() is not None:
                        raise LaunchError(f"{p.name} exited with code {p.popen.returncode} while starting; the "
                                          f"end of {p.log_path}:\n{p.log_tail()}")
                    if health_status(f"127.0.0.1:{p.grpc_port}") == health_pb2.HealthCheckResponse.SERVING:
                        pending.remove(p)
                        bar.update()
                if pending and time.monotonic() > deadline:
                    raise LaunchError(f"not SERVING after {self.ready_timeout_s:.0f} s: "
                                      + ", ".join(f"{p.name} (log {p.log_path})" for p in pending))
                time.sleep(POLL_S)

    def first_exited(self) -> Process | None:
        return next((p for p in self.processes if p.popen.poll() is not None), None)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM each service, gateway first, and wait for it; SIGKILL what is left after `grace_s`."""
        if self._stopped:
            return
        self._stopped = True
        for p in reversed(self.processes):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
                try:
                    p.popen.wait(grace_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop within %.0f s; killing it", p.name, grace_s)
                    p.popen.kill()
                    p.popen.wait()
            log.info("%s stopped (exit code %s)", p.name, p.popen.returncode)


def _redis_answers(port: int) -> bool:
    import redis
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def add_up_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    default_model = "models/tiny-code" if Path("models/tiny-code/config.json").is_file() else None
    p = sub.add_parser("up", help="start a whole cluster on this machine",
                       description="Start a local Tandem cluster as processes: redis-server (unless --redis-url), "
                                   "the controller, expert servers, prefill and decode workers and the gateway; "
                                   "wait until every service is SERVING, print the gateway's address and a sample "
                                   "command, and run until Ctrl-C, which stops everything.")
    p.add_argument("--model", default=default_model, required=default_model is None,
                   help="Hugging Face-layout checkpoint directory (default: the bundled models/tiny-code)")
    p.add_argument("--num-prefill", type=int, default=1, help="prefill workers (default 1)")
    p.add_argument("--num-decode", type=int, default=1, help="decode workers (default 1)")
    p.add_argument("--num-expert-servers", type=int, default=2, help="expert servers (default 2)")
    p.add_argument("--gateway-port", type=int, default=50051, help="the gateway's gRPC port (default 50051)")
    p.add_argument("--controller-port", type=int, default=50050, help="the controller's gRPC port (default 50050)")
    p.add_argument("--store-port", type=int, default=29500, help="the data plane's rendezvous port (default 29500)")
    p.add_argument("--service-port-base", type=int, default=50060,
                   help="expert servers, then prefill and decode workers listen on consecutive ports from here "
                        "(default 50060)")
    p.add_argument("--metrics-port-base", type=int, default=9400,
                   help="Prometheus metrics of every service on consecutive ports from here (default 9400; 0 = off)")
    p.add_argument("--free-ports", action="store_true", help="pick free ports instead of the port flags")
    p.add_argument("--redis-url", default="", help="a running Redis for the expert statistics (default: start a "
                                                   "redis-server on a free port)")
    p.add_argument("--rebalance-interval-s", type=float, default=0.0,
                   help="the controller re-plans the expert placement from the load statistics this often, in "
                        "seconds (default 0: only on demand, `tandem eplb rebalance --controller ...`)")
    p.add_argument("--speculative-tokens", type=int, default=None,
                   help="MTP drafts per decode step at most (default: the model's MTP depth; 0 = off)")
    p.add_argument("--threads-per-service", type=int, default=1,
                   help="torch threads of each service process (default 1: they share the machine's cores)")
    p.add_argument("--log-dir", default="build/cluster-logs", help="one log file per service (default "
                                                                   "build/cluster-logs)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0,
                   help="how long the services may take to become SERVING (default 300)")
    p.add_argument("--print-compose", action="store_true",
                   help="print the docker-compose.yml of this topology and exit (starts nothing)")
    p.set_defaults(func=run_up)
    return p


def topology_from_args(args: argparse.Namespace) -> Topology:
    if not args.print_compose and not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model {args.model}: no config.json there (a Hugging Face-layout checkpoint directory)")
    ports = dict(controller_port=args.controller_port, store_port=args.store_port, gateway_port=args.gateway_port,
                 service_port_base=args.service_port_base, metrics_port_base=args.metrics_port_base)
    if args.free_ports:
        pooled = args.num_expert_servers + args.num_prefill + args.num_decode
        ports["controller_port"], ports["store_port"], ports["gateway_port"] = _distinct_free_ports(3)
        ports["service_port_base"] = free_port_range(pooled)
        if args.metrics_port_base:
            ports["metrics_port_base"] = free_port_range(pooled + 2)
    return Topology(model=args.model, num_prefill=args.num_prefill, num_decode=args.num_decode,
                    num_expert_servers=args.num_expert_servers, redis_url=args.redis_url,
                    rebalance_interval_s=args.rebalance_interval_s,
                    num_speculative_tokens=args.speculative_tokens, threads_per_service=args.threads_per_service,
                    **ports)


def _distinct_free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def free_port_range(n: int) -> int:
    """The first port of `n` consecutive free ports (searched from a random start in `listening_ports`)."""
    ports = listening_ports()
    for _ in range(200):
        start = random.randrange(ports.start, ports.stop - n)
        if not any(port_in_use(p) for p in range(start, start + n)):
            return start
    raise LaunchError(f"no {n} consecutive free ports found")


def run_up(args: argparse.Namespace) -> int:
    import yaml

    topology = topology_from_args(args)
    if args.print_compose:
        sys.stdout.write(COMPOSE_HEADER + yaml.safe_dump(compose_document(topology), sort_keys=False, default_flow_style=None, width=120))
        return 0
    cluster = LocalCluster(topology, Path(args.log_dir), args.ready_timeout_s)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting {len(topology.names())} services with {args.model} (logs in {args.log_dir}) ...",
              flush=True)
        try:
            cluster.start()
        except LaunchError as e:
            print(f"tandem up: error: {e}", file=sys.stderr)
            return 1
        _print_ready(cluster, args.model)
        while not stop.wait(1.0):
            dead = cluster.first_exited()
            if dead is not None:
                print(f"tandem up: {dead.name} exited with code {dead.popen.returncode}; stopping the cluster. "
                      f"The end of {dead.log_path}:\n{dead.log_tail()}", file=sys.stderr)
                return 1
        print("stopping the cluster ...", flush=True)
        return 0
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _print_ready(cluster: LocalCluster, model: str) -> None:
    t = cluster.topology
    lines = [f"Tandem is up: gateway on {cluster.gateway_address} serving {model}",
             f"  {t.num_prefill} prefill, {t.num_decode} decode, {t.num_expert_servers} expert servers; "
             f"controller on 127.0.0.1:{t.controller_port}; Redis {t.redis_url}"]
    if t.metrics_port_base:
        lines.append(f"  Prometheus metrics on ports {t.metrics_port_base}-{t.metrics_port_base + len(t.names()) - 1}"
                     f" ({', '.join(t.names())})")
    every = f" (the controller also does every {t.rebalance_interval_s:g} s)" if t.rebalance_interval_s else ""
    lines += ["Send a request:",
              f"  tandem generate --gateway {cluster.gateway_address} --prompt 'def fibonacci(n):' --max-tokens 64",
              f"Re-plan the expert placement from the load statistics{every}:",
              f"  tandem eplb rebalance --controller 127.0.0.1:{t.controller_port}",
              "Ctrl-C stops the cluster."]
    print("\n".join(lines), flush=True)


COMPOSE_HEADER = """\
# The local cluster of `tandem up` (controller, 2 expert servers, 1 prefill, 1 decode, gateway, Redis) as
# containers of one image (Dockerfile; the bundled model is inside it). Written by `tandem up --print-compose`;
# tests/unit/test_topology.py checks that it matches the launcher's topology. Start: docker compose up --build
"""
