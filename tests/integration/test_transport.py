"""The data plane over real multi-process gloo: expert dispatch against the colocated reference, token
counts, concurrent attention workers, KV handoff between paged caches, and dead or silent expert servers.

Each test starts its ranks as separate processes (transport_ranks.py) on a free port and bounds every wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import transport_ranks as ranks
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("transport_ranks.py")
WORLD_TIMEOUT_S = 40


class World:
    """The processes of one scenario, one per rank, killed on exit whatever happened."""

    def __init__(self, scenario: str, out_dir: Path):
        self.out_dir = out_dir
        world_size = ranks.SCENARIOS[scenario].world_size
        port = free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "libs"), os.environ.get("PYTHONPATH", "")]))
        self.procs = [subprocess.Popen([sys.executable, str(SCRIPT), scenario, str(r), str(world_size), str(port),
                                        str(out_dir)], env=env, stdout=subprocess.DEVNULL,
                                       stderr=open(out_dir / f"rank{r}.log", "w"))
                      for r in range(world_size)]

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def results(self, ranks_to_wait=None, timeout_s: float = WORLD_TIMEOUT_S) -> list[dict]:
        """Wait for the given ranks (all by default) to exit; their result dicts, in rank order."""
        wanted = range(len(self.procs)) if ranks_to_wait is None else ranks_to_wait
        end = time.monotonic() + timeout_s
        for r in wanted:
            try:
                self.procs[r].wait(timeout=max(end - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} still running after {timeout_s}s; its log:\n{self.log(r)}")
        out = []
        for r in wanted:
            path = self.out_dir / f"rank{r}.pt"
            assert path.exists(), f"rank {r} wrote no result; its log:\n{self.log(r)}"
            result = torch.load(path)
            assert "error" not in result, f"rank {r} failed:\n{result['error']}"
            out.append(result)
        return out

    def log(self, rank: int) -> str:
        return (self.out_dir / f"rank{rank}.log").read_text()[-3000:]

    def wait_for(self, name: str, timeout_s: float = 20.0) -> None:
        end = time.monotonic() + timeout_s
        while not (self.out_dir / name).exists():
            if time.monotonic() > end or any(p.poll() is not None for p in self.procs[:1]):
                pytest.fail(f"the attention rank never reached {name}; its log:\n{self.log(0)}")
            time.sleep(0.02)


def expected_counts(attention_results: list[dict]) -> dict[int, torch.Tensor]:
    return {layer: sum(r["routed"][layer] for r in attention_results) for layer in ranks.PHY2LOG}


def server_counts(server_results: list[dict]) -> dict[int, torch.Tensor]:
    return {layer: sum(r["counts"][layer] for r in server_results) for layer in ranks.PHY2LOG}


@pytest.mark.timeout(60)
def test_remote_experts_match_local_and_count_tokens(tmp_path):
    # 1 attention rank, 2 expert servers; layers 1-2 each expert once, layers 3-4 experts 0 and 4 on both
    with World("single", tmp_path) as world:
        attention, *servers = world.results()
    assert attention["max_err"] < 1e-5
    assert not any(server["failed_peers"] for server in servers)
    counts = server_counts(servers)
    for layer, routed in expected_counts([attention]).items():
        assert torch.equal(counts[layer], routed), f"MoE layer {layer}"
    # the replicated experts' tokens were split between both servers
    for layer in (3, 4):
        for server in servers:
            assert server["counts"][layer][0] > 0 and server["counts"][layer][4] > 0


@pytest.mark.timeout(60)
def test_two_attention_ranks_share_the_expert_servers(tmp_path):
    with World("pair", tmp_path) as world:
        *attention, s0, s1 = world.results()
    assert all(a["max_err"] < 1e-5 for a in attention)
    assert not s0["failed_peers"] and not s1["failed_peers"]
    assert s0["num_served"] + s1["num_served"] > 0
    counts = server_counts([s0, s1])
    for layer, routed in expected_counts(attention).items():
        assert torch.equal(counts[layer], routed), f"MoE layer {layer}"


@pytest.mark.timeout(60)
def test_kv_handoff_between_paged_caches(tmp_path):
    with World("kv", tmp_path) as world:
        _, receiver = world.results()
    assert receiver["ids"] == [42, 43]
    assert receiver["table"] != [5, 2, 9, 11]
    assert receiver["err"] == 0
    assert receiver["second_equal"] and receiver["second_dtype"] == "torch.bfloat16"
    assert receiver["untouched_zero"]


@pytest.mark.timeout(60)
def test_dead_or_silent_expert_server_raises_instead_of_hanging(tmp_path):
    with World("dead", tmp_path) as world:
        world.wait_for("phase1")
        world.procs[2].kill()
        world.procs[2].wait()
        (tmp_path / "killed").touch()
        world.wait_for("phase2")
        os.kill(world.procs[1].pid, signal.SIGSTOP)
        (tmp_path / "stopped").touch()
        (attention,) = world.results([0])
    margin = 1.5
    killed, silent = attention["killed"], attention["silent"]
    assert killed["raised"] and killed["elapsed"] < ranks.TIMEOUT_S + margin
    assert "rank 2" in killed["message"] and "MoE layer 1" in killed["message"]
    assert attention["survivor_err"] < 1e-5  # the live server still serves the experts it holds
    assert silent["raised"] and ranks.TIMEOUT_S * 0.9 <= silent["elapsed"] < ranks.TIMEOUT_S + margin
    assert "rank 1" in silent["message"] and "MoE layer 1" in silent["message"]
