"""A real cluster world for the worker tests: a controller in the test process, and prefill and decode workers
(`tandem serve prefill|decode`, each with a Prometheus metrics port) and two expert servers
(`tandem serve expert`) as processes, on a tiny random checkpoint with one MTP layer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import grpc
from grpc_health.v1 import health_pb2

from conftest import free_port
from services.controller.server import ControllerServer
from tandem.cluster.config import ControllerConfig
from tandem.cluster.launcher import health_status
from tandem.model.checkpoint import save_checkpoint
from tandem.model.config import ModelConfig
from tandem.model.loading import export_state_dict
from tandem.model.presets import random_model
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc

ROOT = Path(__file__).resolve().parents[2]
NUM_KV_BLOCKS = 64


def config() -> ModelConfig:
    return ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                       kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                       n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                       max_position_embeddings=256, num_nextn_predict_layers=1)


class World(NamedTuple):
    ckpt: Path
    controller: ControllerServer
    procs: dict[str, subprocess.Popen]  # prefill, decode, expert0, expert1
    logs: dict[str, Path]  # each process's stderr
    metrics_ports: dict[str, int]  # prefill, decode


@contextmanager
def start_world(tmp: Path, worker_flags: tuple[str, ...] = (), expert_flags: tuple[str, ...] = (),
                **controller_settings) -> Iterator[World]:
    """A world whose workers also get `worker_flags`, expert servers `expert_flags`, and the controller
    `controller_settings` (ControllerConfig fields); every process is killed on exit."""
    ckpt = tmp / "ckpt"
    save_checkpoint(ckpt, config(), export_state_dict(random_model(config(), seed=3, std=0.3)), max_shard_bytes=20_000)
    settings = dict(model_dir=str(ckpt), host="127.0.0.1", port=0, store_port=0, num_prefill=1, num_decode=1,
                    num_expert_servers=2, heartbeat_interval_s=0.5, grace_s=0.5)
    controller = ControllerServer(ControllerConfig(**{**settings, **controller_settings})).start()
    address = f"127.0.0.1:{controller.port}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "libs"), str(ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    logs = {}

    def spawn(name, argv):
        logs[name] = tmp / f"{name}.log"
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(logs[name], "w"))

    flags = ["--model", str(ckpt), "--controller", address, "--host", "127.0.0.1", "--port", "0",
             "--block-size", "4", "--num-kv-blocks", str(NUM_KV_BLOCKS), "--kv-timeout-s", "20", "--grace-s", "1",
             *worker_flags]
    procs = {f"expert{i}": spawn(f"expert{i}", [sys.executable, "-m", "tandem.cli", "-v", "serve", "expert",
                                                 "--model-dir", str(ckpt), "--controller", address, "--host",
                                                 "127.0.0.1", "--port", "0", "--grace-s", "1", *expert_flags])
             for i in range(2)}
    metrics_ports = {}
    for role in ("prefill", "decode"):
        metrics_ports[role] = free_port()
        procs[role] = spawn(role, [sys.executable, "-m", "tandem.cli", "-v", "serve", role, *flags,
                                   "--metrics-port", str(metrics_ports[role])])
    try:
        yield World(ckpt, controller, procs, logs, metrics_ports)
    finally:
        for p in procs.values():
            p.kill()
        controller.stop(0)


def wait_serving(controller, procs, logs, timeout_s: float = 60.0) -> dict[int, cpb.Member]:
    """{role: member} once both workers are ready and their health says SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as ch:
        stub = cpb_grpc.ControllerStub(ch)
        while time.monotonic() < deadline:
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited: {logs[name].read_text()[-3000:]}"
            members = {m.role: m for m in stub.ListMembers(cpb.ListMembersRequest()).members}
            if cpb.ROLE_PREFILL in members and cpb.ROLE_DECODE in members and all(
                    members[r].is_ready and health_status(members[r].address) == health_pb2.HealthCheckResponse.SERVING
                    for r in (cpb.ROLE_PREFILL, cpb.ROLE_DECODE)):
                return members
            time.sleep(0.2)
    raise AssertionError("workers not SERVING in time: " + "\n".join(
        f"--- {n}\n{logs[n].read_text()[-2000:]}" for n in logs))


def stop_gracefully(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """SIGTERM the workers; the expert servers, released by both, turn NOT_SERVING; SIGTERM ends them too.
    Every process must exit with 0."""
    for name in ("prefill", "decode"):
        procs[name].send_signal(signal.SIGTERM)
        assert procs[name].wait(timeout=30) == 0, f"{name}: {logs[name].read_text()[-3000:]}"
    for name in ("expert0", "expert1"):
        deadline = time.monotonic() + 30
        while "every attention rank has left the data plane" not in logs[name].read_text():
            assert time.monotonic() < deadline, f"{name} was not released:\n{logs[name].read_text()[-3000:]}"
            time.sleep(0.1)
        procs[name].send_signal(signal.SIGTERM)
        assert procs[name].wait(timeout=30) == 0, f"{name}: {logs[name].read_text()[-3000:]}"
