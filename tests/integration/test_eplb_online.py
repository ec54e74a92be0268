"""Online expert load balancing on a real cluster: a controller reading a real redis-server, two expert servers
(`tandem serve expert`, 5 slots each for 8 experts: 2 redundant), prefill and decode workers (real gloo) and a
gateway.

Under a skewed workload a rebalance raises the balancedness measured on the expert servers (tokens each
server computed), no request fails or changes its greedy tokens while the placement switches, the old
version is freed once both workers switched, and a Redis outage leaves serving alone while statistics resume
once Redis is back.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis

from conftest import free_port
from services.gateway.server import GatewayConfig, GatewayServer
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.loading import load_model
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc
from tandem.v1 import expert_pb2 as epb
from tandem.v1 import expert_pb2_grpc as epb_grpc
from tandem.v1 import gateway_pb2 as gpb
from tandem.v1 import gateway_pb2_grpc as gpb_grpc
from worker_world import start_world, wait_serving

# skewed: the same few tokens over and over route to a few experts
SKEWED = [([50] * 12, 10), ([50, 51] * 6, 10), ([50] * 20, 8), ([51, 50, 50] * 4, 12)]
PROBES = [([5, 9, 3, 11, 2], 10), (list(range(1, 18)), 8), ([42], 12)]


def expert_stubs(controller):
    with grpc.insecure_channel(f"127.0.0.1:{controller.port}") as ch:
        members = cpb_grpc.ControllerStub(ch).ListMembers(cpb.ListMembersRequest(role=cpb.ROLE_EXPERT)).members
    return [epb_grpc.ExpertServerStub(grpc.insecure_channel(m.address)) for m in sorted(members, key=lambda m: m.index)]


def server_tokens(stubs) -> list[list[int]]:
    """[server][row] tokens each expert server computed since start."""
    out = []
    for stub in stubs:
        stats = stub.GetStats(epb.GetStatsRequest(), timeout=5)
        out.append([sum(layer.num_tokens_per_expert) for layer in stats.layers])
    return out


def measured_balancedness(before, after) -> float:
    """Mean over placement rows of mean server tokens / max server tokens, over the tokens between two reads."""
    values = []
    for row in range(len(before[0])):
        loads = [a[row] - b[row] for a, b in zip(after, before)]
        if max(loads) > 0:
            values.append(sum(loads) / len(loads) / max(loads))
    return sum(values) / len(values)


def generate(stub, prompt, max_tokens) -> list[int]:
    return [t for m in stub.Generate(gpb.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens,
                                                         speculative_tokens=-1), timeout=60) for t in m.token_ids]


@pytest.mark.timeout(300)
def test_rebalance_balances_the_servers_without_failing_or_changing_a_request(tmp_path, redis_process):
    expert_flags = ("--redis-url", redis_process.url, "--stats-window-s", "1", "--stats-flush-interval-s", "0.2")
    with start_world(tmp_path, expert_flags=expert_flags, num_slots_per_server=5, redis_url=redis_process.url,
                     stats_model_name="ckpt", rebalance_min_gain=0.0, rebalance_windows=1000,
                     rebalance_decay=1.0, ack_timeout_s=20.0) as world:
        wait_serving(world.controller, world.procs, world.logs)
        colocated = Engine(load_model(world.ckpt), EngineConfig(num_speculative_tokens=0))
        prompts = SKEWED + PROBES
        expected = {tuple(p): c.token_ids for (p, _), c in zip(
            prompts, colocated.generate([p for p, _ in prompts], [SamplingParams(max_tokens=n) for _, n in prompts]))}
        gateway = GatewayServer.from_config(GatewayConfig(
            model=str(world.ckpt), controller=f"127.0.0.1:{world.controller.port}", host="127.0.0.1", port=0,
            max_queued=16, grace_s=0.0, metrics_port=free_port())).start()
        channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
        stub = gpb_grpc.GatewayStub(channel)
        controller_ch = grpc.insecure_channel(f"127.0.0.1:{world.controller.port}")
        controller = cpb_grpc.ControllerStub(controller_ch)
        experts = expert_stubs(world.controller)
        try:
            # phase 1: the static placement under the skewed load
            start = server_tokens(experts)
            with ThreadPoolExecutor(4) as pool:
                for (prompt, n), tokens in zip(SKEWED, pool.map(lambda r: generate(stub, *r), SKEWED)):
                    assert tokens == expected[tuple(prompt)]
            static = measured_balancedness(start, server_tokens(experts))
            time.sleep(1.0)  # the servers flush their counts to Redis every 0.2 s

            # the switch, with requests in flight all along
            failures, served, stop = [], [], threading.Event()

            def keep_sending():
                while not stop.is_set():
                    for prompt, n in PROBES:
                        try:
                            tokens = generate(stub, prompt, n)
                        except grpc.RpcError as e:
                            failures.append(f"{e.code().name}: {e.details()}")
                            continue
                        served.append(tokens == expected[tuple(prompt)])
            sender = threading.Thread(target=keep_sending)
            sender.start()
            time.sleep(0.5)
            outcome = controller.Rebalance(cpb.RebalanceRequest(), timeout=120)
            time.sleep(1.0)
            stop.set()
            sender.join(timeout=60)
            assert outcome.applied, outcome.reason
            assert outcome.placement_version == 2 and outcome.num_moved_experts > 0
            assert outcome.balancedness_after > outcome.balancedness_before
            assert failures == [] and served and all(served), (failures, served)

            # both workers switched and acknowledged; the servers freed version 1
            deadline = time.monotonic() + 20
            while any(list(s.GetStats(epb.GetStatsRequest(), timeout=5).placement_versions) != [2] for s in experts):
                assert time.monotonic() < deadline, "version 1 was never freed"
                time.sleep(0.2)

            # phase 2: the same load, balanced
            start = server_tokens(experts)
            with ThreadPoolExecutor(4) as pool:
                for (prompt, n), tokens in zip(SKEWED, pool.map(lambda r: generate(stub, *r), SKEWED)):
                    assert tokens == expected[tuple(prompt)]
            balanced = measured_balancedness(start, server_tokens(experts))
            assert balanced > static, (static, balanced)

            # Redis goes away: serving goes on, the controller says statistics are unavailable
            redis_process.stop()
            assert generate(stub, *PROBES[0]) == expected[tuple(PROBES[0][0])]
            down = controller.Rebalance(cpb.RebalanceRequest(), timeout=60)
            assert not down.applied and "statistics unavailable" in down.reason
            assert down.placement_version == 2
            # ... and comes back: the servers deliver the counts they kept, the controller reads them again
            redis_process.start()
            generate(stub, *SKEWED[0])
            deadline = time.monotonic() + 30
            restarted = redis.Redis.from_url(redis_process.url)
            while not restarted.keys("tandem:ckpt:expert_load:*"):  # the servers retry on their flush interval
                assert time.monotonic() < deadline, "the expert servers never delivered their counts"
                time.sleep(0.2)
            while "statistics unavailable" in (up := controller.Rebalance(cpb.RebalanceRequest(), timeout=60)).reason:
                assert time.monotonic() < deadline, up.reason
                time.sleep(0.5)
        finally:
            channel.close()
            controller_ch.close()
            gateway.stop(0)
