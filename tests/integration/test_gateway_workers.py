"""The gateway in worker mode (`WorkerBackend`) in front of a real world: a controller in the test process, prefill
and decode workers and two expert servers as processes (real gloo), the gateway in-process. Concurrent greedy
streams equal the colocated engine's tokens and every service's Prometheus metrics add up (step times and expert
exchange times included); GetModelInfo reports the cluster's shape from the controller (UNAVAILABLE without one);
a client cancelling mid-way frees the decode worker's KV blocks (seen on its metrics endpoint); health is
SERVING; SIGTERM ends every process cleanly. In a world of its own: a killed expert server fails the requests in
flight with UNAVAILABLE within a bounded time, the workers whose engines failed turn NOT_SERVING and not ready,
the gateway stays up and refuses new requests at once, naming the role without a ready worker."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from conftest import free_port
from services.gateway.server import GatewayConfig, GatewayServer
from tandem.cluster.launcher import health_status
from tandem.cluster.metrics import scrape
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.gateway.workers import WorkerBackend
from tandem.model.checkpoint import save_checkpoint
from tandem.model.loading import export_state_dict, load_model
from tandem.model.presets import random_model
from tandem.v1 import controller_pb2_grpc as cpb_grpc
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import gateway_pb2 as gpb
from tandem.v1 import gateway_pb2_grpc as gpb_grpc
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc as pb_grpc
from worker_world import NUM_KV_BLOCKS, config, start_world, stop_gracefully, wait_serving

# (prompt, max_tokens, GenerateRequest.speculative_tokens: -1 none, 0 the server's default)
REQUESTS = [([5, 9, 3, 11, 2], 12, 1), (list(range(1, 18)), 10, -1), ([7, 7, 7] + list(range(40, 60)), 14, 0),
            ([42], 8, 1)]
OK = 'tandem_requests_total{code="OK"}'


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_world(tmp_path_factory.mktemp("gateway-workers")) as world:
        yield world


def start_gateway(world) -> GatewayServer:
    return GatewayServer.from_config(GatewayConfig(
        model=str(world.ckpt), controller=f"127.0.0.1:{world.controller.port}", host="127.0.0.1", port=0,
        max_queued=8, grace_s=0.0, metrics_port=free_port())).start()


@pytest.fixture(scope="module")
def gateway(cluster):
    """(gateway, its stub, the decode worker's stub) once both workers serve."""
    members = wait_serving(cluster.controller, cluster.procs, cluster.logs)
    server = start_gateway(cluster)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    decode_ch = grpc.insecure_channel(members[cpb.ROLE_DECODE].address)
    yield server, gpb_grpc.GatewayStub(channel), pb_grpc.DecodeWorkerStub(decode_ch)
    channel.close()
    decode_ch.close()
    server.stop(0)


def eventually(check, timeout_s: float = 10.0) -> None:
    """Poll `check()` (an assertion) until it passes: a worker records a call's end after the gateway got its
    last message, and publishes its engine's stats after the step that changed them."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def grew(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_gateway_over_workers(cluster, gateway):
    server, stub, decode = gateway
    colocated = Engine(load_model(cluster.ckpt), EngineConfig(num_speculative_tokens=1, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate([r[0] for r in REQUESTS],
                                                        [SamplingParams(max_tokens=r[1]) for r in REQUESTS])]
    assert isinstance(server.runner, WorkerBackend) and server.runner.num_speculative_tokens == 1  # the MTP depth
    assert health_status(f"127.0.0.1:{server.port}") == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetModelInfo(gpb.GetModelInfoRequest())
    assert info.max_context_tokens == config().max_position_embeddings
    with grpc.insecure_channel(f"127.0.0.1:{cluster.controller.port}") as ch:
        placement = cpb_grpc.ControllerStub(ch).GetPlacement(cpb.GetPlacementRequest())
    # static placement: the 8 routed experts once each, 4 slots on each of the 2 expert servers, version 1
    assert (placement.num_slots_per_server, placement.version) == (4, 1)
    assert info.cluster == gpb.ClusterShape(num_prefill_workers=1, num_decode_workers=1, num_expert_servers=2,
                                            num_slots_per_server=4, placement_version=1)
    ports = {"gateway": server.metrics_port, **cluster.metrics_ports}
    before = {name: scrape(port) for name, port in ports.items()}

    def run(i):
        prompt, max_tokens, spec = REQUESTS[i]
        return list(stub.Generate(gpb.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens,
                                                      speculative_tokens=spec, request_id=f"r{i}"), timeout=60))

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(run, range(len(REQUESTS))))
    assert [[t for m in ms for t in m.token_ids] for ms in results] == expected
    for i, ms in enumerate(results):
        last = ms[-1]
        assert last.finish_reason in (gpb.FINISH_REASON_STOP, gpb.FINISH_REASON_LENGTH)
        assert all(m.request_id == f"r{i}" for m in ms)
        assert (last.usage.num_prompt_tokens, last.usage.num_completion_tokens) == (len(REQUESTS[i][0]),
                                                                                    len(expected[i]))
        assert last.usage.num_accepted_draft_tokens <= last.usage.num_draft_tokens
        if REQUESTS[i][2] == -1:
            assert last.usage.num_draft_tokens == 0
    drafts = sum(ms[-1].usage.num_draft_tokens for ms in results)
    accepted = sum(ms[-1].usage.num_accepted_draft_tokens for ms in results)
    assert drafts > 0, "the decode worker drafts with MTP"
    assert decode.GetLoad(pb.GetLoadRequest()).num_free_kv_blocks == NUM_KV_BLOCKS
    check_metrics_after_workload(ports, before, expected, drafts, accepted)


def test_a_first_token_constraint_reaches_the_prefill_worker(cluster, gateway):
    """Token healing's allowed first tokens travel gateway -> prefill worker, which samples the first token."""
    server = gateway[0]
    prompt, params = [5, 9, 3, 11, 2], SamplingParams(max_tokens=5, allowed_first_tokens=(17, 23, 61))
    colocated = Engine(load_model(cluster.ckpt), EngineConfig(num_speculative_tokens=1, adaptive_speculation=False))
    want, free = colocated.generate([prompt] * 2, [params, SamplingParams(max_tokens=5)])
    assert want.token_ids[0] in params.allowed_first_tokens and free.token_ids[0] not in params.allowed_first_tokens
    stream, tokens = server.runner.submit(prompt, params, "constrained"), []
    while not stream.is_finished:
        out = stream.get(timeout=60)
        assert out is not None, "no output within 60 s"
        tokens += out.new_token_ids
    assert tokens == want.token_ids


def check_metrics_after_workload(ports: dict[str, int], before: dict[str, dict], expected: list[list[int]],
                                 drafts: int, accepted: int) -> None:
    n, num_tokens = len(REQUESTS), sum(len(t) for t in expected)
    num_prompt = sum(len(r[0]) for r in REQUESTS)
    g = scrape(ports["gateway"])  # recorded before each stream's status reached the client
    gb = before["gateway"]
    assert grew(gb, g, OK) == n and grew(gb, g, "tandem_request_latency_seconds_count") == n
    assert (grew(gb, g, "tandem_prompt_tokens_total"), grew(gb, g, "tandem_generation_tokens_total")) == \
        (num_prompt, num_tokens)
    assert grew(gb, g, "tandem_time_to_first_token_seconds_count") == n
    assert 0 < grew(gb, g, "tandem_time_to_first_token_seconds_sum") < n * 60
    # the first message carries the prefill worker's token alone: every later token has a gap
    assert grew(gb, g, "tandem_inter_token_latency_seconds_count") == num_tokens - n
    assert grew(gb, g, "tandem_time_to_first_token_seconds_sum") <= grew(gb, g, "tandem_request_latency_seconds_sum")
    assert (grew(gb, g, "tandem_spec_draft_tokens_total"), grew(gb, g, "tandem_spec_accepted_tokens_total")) == \
        (drafts, accepted)

    def gateway_idle():  # a request leaves the queue once its decode call's OK status came, after the last message
        m = scrape(ports["gateway"])
        assert m['tandem_queue_requests{state="waiting"}'] == m['tandem_queue_requests{state="running"}'] == 0

    eventually(gateway_idle)

    def decode_added_up():
        d, db = scrape(ports["decode"]), before["decode"]
        assert grew(db, d, OK) == n and grew(db, d, "tandem_generation_tokens_total") == num_tokens - n
        assert grew(db, d, "tandem_time_to_first_token_seconds_count") == n  # per sequence: its second token
        assert 0 < grew(db, d, "tandem_inter_token_latency_seconds_count") <= num_tokens - 2 * n
        assert (grew(db, d, "tandem_spec_draft_tokens_total"), grew(db, d, "tandem_spec_accepted_tokens_total")) == \
            (drafts, accepted)
        # one MTP module: every draft is at position 0
        assert (grew(db, d, 'tandem_spec_draft_tokens_by_position_total{position="0"}'),
                grew(db, d, 'tandem_spec_accepted_tokens_by_position_total{position="0"}')) == (drafts, accepted)
        assert (d["tandem_kv_blocks_used"], d["tandem_kv_blocks_total"]) == (0, NUM_KV_BLOCKS)
        assert d['tandem_queue_requests{state="running"}'] == 0

    eventually(decode_added_up)
    p, pb_ = scrape(ports["prefill"]), before["prefill"]
    assert grew(pb_, p, OK) == n and grew(pb_, p, "tandem_generation_tokens_total") == n
    assert grew(pb_, p, "tandem_prompt_tokens_total") == num_prompt
    assert grew(pb_, p, "tandem_time_to_first_token_seconds_count") == n
    assert (p["tandem_kv_blocks_used"], p["tandem_kv_blocks_total"]) == (0, NUM_KV_BLOCKS)
    assert p.get("tandem_spec_draft_tokens_total") == 0  # prefill-only requests verify no drafts
    check_step_profile(before["prefill"], p, "prefill")
    check_step_profile(before["decode"], scrape(ports["decode"]), "decode")


def check_step_profile(before: dict, after: dict, phase: str) -> None:
    """The engine's steps and its expert exchanges were timed: every step that ran a batch exchanged with the
    expert servers for each of the 2 main MoE layers (and the MTP layer when drafting), inside the step's time."""
    steps = grew(before, after, f'tandem_engine_step_seconds_count{{phase="{phase}"}}')
    step_s = grew(before, after, f'tandem_engine_step_seconds_sum{{phase="{phase}"}}')
    exchanges = grew(before, after, "tandem_expert_exchanges_total")
    exchange_s = grew(before, after, "tandem_expert_exchange_seconds_total")
    assert steps > 0 and exchanges >= 2 * steps, (phase, steps, exchanges)
    assert 0 < exchange_s < step_s, (phase, exchange_s, step_s)


def test_cancelling_a_stream_mid_way_frees_its_kv_blocks(cluster, gateway):
    server, stub, decode = gateway
    port = cluster.metrics_ports["decode"]
    idle = scrape(port)["tandem_kv_blocks_used"]
    cancelled_before = scrape(server.metrics_port).get('tandem_requests_total{code="CANCELLED"}', 0)
    stream = stub.Generate(gpb.GenerateRequest(prompt_token_ids=list(range(1, 30)), max_tokens=200,
                                               speculative_tokens=1), timeout=60)
    next(stream)

    def holds_blocks():
        m = scrape(port)
        assert m["tandem_kv_blocks_used"] > idle and m['tandem_queue_requests{state="running"}'] == 1, \
            "the request never reached the decode worker"

    eventually(holds_blocks, 5)
    stream.cancel()  # the gateway cancels on the decode worker, which frees the blocks at once

    def freed():
        m = scrape(port)
        assert m["tandem_kv_blocks_used"] == idle and m['tandem_queue_requests{state="running"}'] == 0
        assert scrape(server.metrics_port).get('tandem_requests_total{code="CANCELLED"}', 0) == cancelled_before + 1

    eventually(freed, 5)
    assert decode.GetLoad(pb.GetLoadRequest()).num_free_kv_blocks == NUM_KV_BLOCKS
    eventually(lambda: assert_no_open(server.runner), 5)


def assert_no_open(backend: WorkerBackend) -> None:
    assert backend.num_open == 0, "the gateway still holds the cancelled request"


def test_model_info_without_a_controller_is_unavailable(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, config(), export_state_dict(random_model(config(), seed=3, std=0.3)))
    server = GatewayServer.from_config(GatewayConfig(model=str(ckpt), controller=f"127.0.0.1:{free_port()}",
                                                     host="127.0.0.1", port=0, grace_s=0.0)).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                gpb_grpc.GatewayStub(channel).GetModelInfo(gpb.GetModelInfoRequest(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "cluster shape" in err.value.details() and "controller" in err.value.details()
        assert time.monotonic() - started < 10
    finally:
        server.stop(0)


def test_sigterm_ends_every_process(cluster, gateway):
    stop_gracefully(cluster.procs, cluster.logs)


@pytest.mark.timeout(180)
def test_killed_expert_server_fails_in_flight_requests_with_unavailable(tmp_path):
    flags = ("--expert-timeout-s", "3", "--kv-timeout-s", "5", "--num-kv-blocks", "256")
    with start_world(tmp_path, flags) as world:
        wait_serving(world.controller, world.procs, world.logs)
        server = start_gateway(world)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                check_expert_kill(world, server, gpb_grpc.GatewayStub(channel))
        finally:
            server.stop(0)


def check_expert_kill(world, server: GatewayServer, stub) -> None:
    streams = [stub.Generate(gpb.GenerateRequest(prompt_token_ids=[3 + i, 5, 8], max_tokens=200,
                                                 speculative_tokens=1), timeout=120) for i in range(3)]
    for s in streams:
        assert not next(s).finish_reason  # each is in flight
    world.procs["expert0"].kill()
    killed = time.monotonic()
    for s in streams:
        with pytest.raises(grpc.RpcError) as err:
            for _ in s:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert time.monotonic() - killed < 30, "requests hung after the expert server died"
    assert health_status(f"127.0.0.1:{server.port}") == health_pb2.HealthCheckResponse.SERVING
    assert scrape(server.metrics_port)['tandem_requests_total{code="UNAVAILABLE"}'] == len(streams)
    with grpc.insecure_channel(f"127.0.0.1:{world.controller.port}") as channel:
        check_workers_stop_serving(world, cpb_grpc.ControllerStub(channel), stub)


def check_workers_stop_serving(world, controller: cpb_grpc.ControllerStub, stub) -> None:
    members = {m.role: m for m in controller.ListMembers(cpb.ListMembersRequest()).members}
    # the decode worker's engine failed with its streams: it stops looking healthy
    wait_not_serving(controller, members[cpb.ROLE_DECODE])
    assert "the engine failed" in world.logs["decode"].read_text()
    # a new request fails at once: the gateway picks no worker that is not ready
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gpb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=4), timeout=60))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 10
    assert "no decode worker is ready" in err.value.details(), err.value.details()
    # the idle prefill worker learns of the dead expert server with its next request (here sent to it directly,
    # as a gateway that picked it before the decode worker failed would): its engine fails the same way
    with grpc.insecure_channel(members[cpb.ROLE_PREFILL].address) as channel:
        prefill = pb_grpc.PrefillWorkerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            prefill.Prefill(pb.PrefillRequest(request_id="after-kill", prompt_token_ids=[1, 2, 3],
                                              sampling=pb.SamplingParams(max_tokens=4, top_p=1.0), kv_transfer_id=1,
                                              decode_rank=members[cpb.ROLE_DECODE].rank), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        wait_not_serving(controller, members[cpb.ROLE_PREFILL])
        with pytest.raises(grpc.RpcError) as err:  # later calls name the cause
            prefill.GetLoad(pb.GetLoadRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine failed" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(gpb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=4), timeout=60))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no prefill worker is ready (1 registered, none ready)" in err.value.details(), err.value.details()


def wait_not_serving(controller: cpb_grpc.ControllerStub, member: cpb.Member, timeout_s: float = 10.0) -> None:
    """The worker's health says NOT_SERVING and the controller lists it not ready, within timeout_s (its failure
    heartbeat goes out at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = [m for m in controller.ListMembers(cpb.ListMembersRequest(role=member.role)).members
                  if m.member_id == member.member_id]
        status = health_status(member.address)
        if status == health_pb2.HealthCheckResponse.NOT_SERVING and listed and not listed[0].is_ready:
            return
        assert time.monotonic() < deadline, (f"{member.address}: health {status}, listed {listed} "
                                             f"{timeout_s}s after its engine failed")
        time.sleep(0.05)
