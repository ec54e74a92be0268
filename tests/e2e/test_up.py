"""The cluster as a user runs it: `tandem up` starts controller, 2 expert servers, 1 prefill, 1 decode and the
gateway as processes (real gRPC on loopback, real gloo data plane, a real redis-server), and `tandem generate
--gateway` talks to it.

What it must show: concurrent streams with different prompts, lengths and speculative_tokens return exactly the
colocated engine's greedy tokens; seeded sampling replays; the Redis counters grow by exactly the tokens the
colocated model routes to each expert of each MoE layer over the same workload; every service is SERVING;
Ctrl-C (SIGINT) stops every process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.eplb.stats import read_load
from tandem.gateway.client import GatewayClient
from tandem.model.checkpoint import save_checkpoint
from tandem.model.config import ModelConfig
from tandem.model.loading import export_state_dict, load_model
from tandem.model.presets import random_model
from tandem.moe.experts import LocalExperts
from tandem.transport.expert_parallel import moe_layer_ids
from tandem.v1 import gateway_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"Tandem is up: gateway on (\S+)")
# (prompt, max_tokens, speculative_tokens on the wire: -1 none, 0 the server's default, n at most n)
REQUESTS = [([5, 9, 3, 11, 2], 12, 1), (list(range(1, 18)), 10, -1), ([7, 7, 7] + list(range(40, 60)), 14, 0),
            ([42], 8, 2), ([3, 1, 4, 1, 5, 9, 2, 6], 16, 2), (list(range(60, 20, -1)), 6, 0), ([11, 12], 20, 1),
            ([50] * 9, 9, -1)]


def model_config() -> ModelConfig:
    return ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                       kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                       n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                       max_position_embeddings=256, num_nextn_predict_layers=2)


def cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "libs"), str(ROOT), os.environ.get("PYTHONPATH", "")]))


class Launcher:
    """`tandem up` as a subprocess, its output collected by a thread."""

    def __init__(self, argv: list[str]):
        self.process = subprocess.Popen([sys.executable, "-m", "tandem.cli", "up", *argv], cwd=ROOT, env=cli_env(),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = READY.search(self.output)
            if match:
                return match.group(1)
            assert self.process.poll() is None, f"tandem up exited with {self.process.returncode}:\n{self.output}"
            time.sleep(0.5)
        raise AssertionError(f"tandem up not ready in {timeout_s} s:\n{self.output}")


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains `text` (the cluster's checkpoint path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = (entry / "status").read_text()
            except OSError:
                continue
            if text in cmdline and "State:\tZ" not in status:
                pids.append(int(entry.name))
    return pids


def routed_counts(engine: Engine, run) -> torch.Tensor:
    """[placement rows, experts]: tokens the colocated model routes to each logical expert while `run()` runs."""
    model = engine.model
    rows = moe_layer_ids(model.config)
    counts = torch.zeros(len(rows), model.config.n_routed_experts, dtype=torch.float64)
    hooks = []
    for row, layer_id in enumerate(rows):
        experts = model.model.layers[layer_id].mlp.experts
        assert isinstance(experts, LocalExperts)

        def count(_module, args, row=row):
            counts[row] += torch.bincount(args[1].flatten(), minlength=counts.shape[1]).double()
        hooks.append(experts.register_forward_pre_hook(count))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return counts


def settled_load(client: redis.Redis, model: str, shape: tuple[int, int], timeout_s: float = 30.0) -> torch.Tensor:
    """The expert servers' Redis totals once they stop changing (they flush every second)."""
    previous, stable_since = None, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = read_load(client, model, *shape, windows=10_000)
        if previous is None or not torch.equal(load, previous):
            previous, stable_since = load, time.monotonic()
        elif time.monotonic() - stable_since > 3.0:
            return load
        time.sleep(0.5)
    raise AssertionError("the Redis counters never settled")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("up") / "tiny-moe"
    save_checkpoint(path, model_config(), export_state_dict(random_model(model_config(), seed=5, std=0.3)))
    return path


@pytest.fixture(scope="module")
def cluster(checkpoint, redis_server, tmp_path_factory):
    launcher = Launcher(["--model", str(checkpoint), "--free-ports", "--redis-url", redis_server, "--log-dir",
                         str(tmp_path_factory.mktemp("logs")), "--ready-timeout-s", "240"])
    try:
        address = launcher.wait_ready(timeout_s=300)
        yield launcher, address
    finally:
        if launcher.process.poll() is None:
            launcher.process.kill()
        for pid in processes_mentioning(str(checkpoint)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_tandem_up_serves_the_colocated_engines_tokens_and_counts_every_routed_token(checkpoint, cluster,
                                                                                     redis_server):
    launcher, address = cluster
    assert "tandem generate --gateway" in launcher.output
    engine = Engine(load_model(checkpoint), EngineConfig(num_speculative_tokens=0))
    expected = [c.token_ids for c in engine.generate([r[0] for r in REQUESTS],
                                                     [SamplingParams(max_tokens=r[1]) for r in REQUESTS])]
    client = GatewayClient(address)
    client.wait_ready(30)
    info = client.model_info()
    assert (info.num_mtp_layers, info.num_routed_experts) == (2, 8)

    def run(i):
        prompt, max_tokens, spec = REQUESTS[i]
        return client.generate(pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens,
                                                  speculative_tokens=spec), timeout_s=120)

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        completions = list(pool.map(run, range(len(REQUESTS))))
    for i, (completion, want) in enumerate(zip(completions, expected)):
        assert completion.token_ids == want, f"request {i}"
        assert completion.finish_reason == "length"
        assert completion.usage["completion_tokens"] == len(want)

    seeded = pb.GenerateRequest(prompt_token_ids=[9, 8, 7], max_tokens=12, temperature=0.9, seed=1234)
    assert client.generate(seeded).token_ids == client.generate(seeded).token_ids

    # Redis: the growth over a workload without speculation equals what the colocated model routes for it
    redis_client = redis.Redis.from_url(redis_server)
    shape = (len(moe_layer_ids(model_config())), model_config().n_routed_experts)
    before = settled_load(redis_client, checkpoint.name, shape)
    plain = [r for r in REQUESTS if r[2] == -1] + [([2, 4, 6, 8, 10, 12], 7, -1)]
    with ThreadPoolExecutor(len(plain)) as pool:
        list(pool.map(lambda r: client.generate(pb.GenerateRequest(prompt_token_ids=r[0], max_tokens=r[1],
                                                                   speculative_tokens=-1)), plain))
    grown = settled_load(redis_client, checkpoint.name, shape) - before
    reference = routed_counts(engine, lambda: engine.generate([r[0] for r in plain],
                                                              [SamplingParams(max_tokens=r[1]) for r in plain]))
    assert reference.sum() > 0
    assert torch.equal(grown, reference), f"Redis grew by\n{grown}\nthe colocated model routed\n{reference}"
    client.close()

    # the CLI client, and every service's health through the CLI
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "--gateway", address, "--prompt-ids",
                          ",".join(map(str, REQUESTS[0][0])), "--max-tokens", str(REQUESTS[0][1]), "--json"],
                         cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["token_ids"] == expected[0]
    health = subprocess.run([sys.executable, "-m", "tandem.cli", "health", address], cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=60)
    assert health.returncode == 0 and "SERVING" in health.stdout

    # Ctrl-C stops everything
    assert len(processes_mentioning(str(checkpoint))) >= 6
    launcher.process.send_signal(signal.SIGINT)
    assert launcher.process.wait(timeout=120) == 0, launcher.output
    assert processes_mentioning(str(checkpoint)) == []
    refused = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "--gateway", address, "--prompt-ids",
                              "1,2", "--max-tokens", "2"], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 1 and "no gateway answers" in refused.stderr


def test_a_busy_port_is_named_and_nothing_starts(checkpoint, tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "tandem.cli", "up", "--model", str(checkpoint), "--gateway-port",
                              str(port), "--log-dir", str(tmp_path)], cwd=ROOT, env=cli_env(), capture_output=True,
                             text=True, timeout=120)
    assert out.returncode == 1
    assert "already in use" in out.stderr and str(port) in out.stderr
    assert processes_mentioning(str(tmp_path)) == []


def test_a_missing_model_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "up", "--model", str(tmp_path / "nope")], cwd=ROOT,
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr
