"""The gateway over real gRPC on loopback, in front of a real colocated engine on a tiny random model: greedy
streams equal the engine's own tokens, seeded sampling replays, stop strings, every bad input's status and
message, the admission queue, cancellation and deadlines freeing KV blocks, engine failure, health, model
info, reflection, the Prometheus metrics and the config flags."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tandem.cli import main as tandem_main
from tandem.cluster.config import build_config
from tandem.cluster.metrics import scrape
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.runner import EngineRunner
from tandem.engine.sampling import SamplingParams
from tandem.engine.token_healing import TokenHealer
from conftest import free_port
from services.gateway.server import GatewayConfig, GatewayServer, add_gateway_parser, model_info
from tandem.model.loading import load_model
from tandem.model.tokenizer import load_tokenizer
from tandem.v1 import gateway_pb2 as pb
from tandem.v1 import gateway_pb2_grpc as pb_grpc

MAX_DRAFTS = 2  # the tiny preset's MTP depth
LONG = 1500  # max_tokens of a request that is still running when the test acts on it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-model")
    assert tandem_main(["init-model", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir)


def start_gateway(model_dir, max_queued: int, metrics_port: int = 0) -> GatewayServer:
    """A gateway on a free loopback port with its own engine (engines are not thread-safe, so none is shared)."""
    engine = Engine(load_model(model_dir), EngineConfig(max_num_seqs=8, num_speculative_tokens=MAX_DRAFTS))
    return GatewayServer(EngineRunner(engine, max_queued), load_tokenizer(model_dir), model_info(engine, "tiny"),
                         host="127.0.0.1", port=0, grace_s=0.0, metrics_port=metrics_port).start()


@pytest.fixture(scope="module")
def gateway(model_dir):
    server = start_gateway(model_dir, max_queued=16)
    yield server
    server.stop(0.0)


@pytest.fixture(scope="module")
def channel(gateway):
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GatewayStub(channel)


def collect(stub, request: pb.GenerateRequest, timeout: float = 30) -> tuple[list[int], str, pb.GenerateResponse]:
    """(token ids, text, last message) of a whole stream."""
    ids, text, last = [], "", None
    for msg in stub.Generate(request, timeout=timeout):
        assert last is None or last.finish_reason == pb.FINISH_REASON_UNSPECIFIED, "messages after the last"
        ids += msg.token_ids
        text += msg.text
        last = msg
    return ids, text, last


def wait_all_blocks_free(server: GatewayServer, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = server.runner.stats()
        if stats.num_free_blocks == stats.num_blocks and stats.num_running == stats.num_waiting == 0:
            return
        assert time.monotonic() < deadline, f"KV blocks not freed: {stats}"
        time.sleep(0.02)


def status_of(stub, request: pb.GenerateRequest, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        collect(stub, request, timeout)
    return err.value.code(), err.value.details()


def test_concurrent_greedy_streams_equal_the_engine(model_dir, tokenizer, gateway, stub):
    texts = ["def main():", "import os\nimport sys\n", "class Foo(Bar):\n    def", "for i in range(10):"]
    requests = [pb.GenerateRequest(prompt=t, max_tokens=8 + 5 * i, speculative_tokens=(0, -1, 1, 2)[i % 4],
                                   request_id=f"r{i}") for i, t in enumerate(texts)]
    requests += [pb.GenerateRequest(prompt_token_ids=[7 + i, 300 + 11 * i, 42] * (i + 1), max_tokens=30 - 4 * i,
                                    speculative_tokens=(2, 1, -1, 0)[i]) for i in range(4)]
    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(lambda r: collect(stub, r), requests))

    reference = Engine(load_model(model_dir), EngineConfig(max_num_seqs=8, num_speculative_tokens=MAX_DRAFTS))
    healer = TokenHealer(tokenizer)
    for req, (ids, text, last) in zip(requests, results):
        prompt, params = list(req.prompt_token_ids), SamplingParams(max_tokens=req.max_tokens)
        if not prompt:  # a text prompt: healed as the gateway does
            healed = healer.heal(tokenizer.encode(req.prompt).ids)
            prompt, params = healed.prompt_ids, healed.apply(params)
        [want] = reference.generate([prompt], params)
        assert ids == want.token_ids, req
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        assert text == decoded.removeprefix(params.skip_text_prefix)
        assert last.finish_reason == {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}[
            want.finish_reason]
        assert last.usage.num_prompt_tokens == len(prompt) and last.usage.num_completion_tokens == len(ids)
        assert 0 <= last.usage.num_accepted_draft_tokens <= last.usage.num_draft_tokens
        if req.speculative_tokens == -1:
            assert last.usage.num_draft_tokens == 0
        assert last.request_id == (req.request_id or last.request_id) and last.request_id
    assert sum(r[2].usage.num_draft_tokens for r in results) > 0, "no request drafted"
    wait_all_blocks_free(gateway)


def test_a_prompt_ending_mid_token_is_healed_unless_disabled(tokenizer, stub):
    prompt = "def "  # ends in a lone-space token: the first generated token must start with the space
    healed_ids, healed_text, healed_last = collect(stub, pb.GenerateRequest(prompt=prompt, max_tokens=6))
    first = tokenizer.decode(healed_ids[:1])
    assert first.startswith(" "), first
    assert healed_text == tokenizer.decode(healed_ids)[1:]  # the space is the prompt's, not sent twice
    assert healed_last.usage.num_prompt_tokens == len(tokenizer.encode(prompt).ids) - 1
    plain_ids, plain_text, plain_last = collect(stub, pb.GenerateRequest(prompt=prompt, max_tokens=6,
                                                                         disable_token_healing=True))
    assert plain_last.usage.num_prompt_tokens == len(tokenizer.encode(prompt).ids)
    assert plain_text == tokenizer.decode(plain_ids)
    ids_prompt = collect(stub, pb.GenerateRequest(prompt_token_ids=tokenizer.encode(prompt).ids, max_tokens=6))
    assert ids_prompt[0] == plain_ids  # token-id prompts are never healed


def test_seeded_sampling_replays(stub):
    req = pb.GenerateRequest(prompt="def f(x):", max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234,
                             speculative_tokens=2)
    first, second = collect(stub, req)[0], collect(stub, req)[0]
    assert first == second and len(first) == 24


def test_stop_string_ends_the_stream_and_frees_the_request(tokenizer, gateway, stub):
    base = pb.GenerateRequest(prompt="import os", max_tokens=40)
    ids, text, _ = collect(stub, base)
    stop = next(text[i:i + 3] for i in range(5, len(text) - 3) if text[i:i + 3].strip())
    base.stop.append(stop)
    stopped_ids, stopped_text, last = collect(stub, base)
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert stopped_text == text[: text.index(stop)]
    assert stopped_ids == ids[: len(stopped_ids)] and stop in tokenizer.decode(stopped_ids)
    assert last.usage.num_completion_tokens == len(stopped_ids)
    wait_all_blocks_free(gateway)


BAD = [
    (dict(max_tokens=4), "prompt"),  # neither prompt nor ids (an empty prompt)
    (dict(prompt="x", prompt_token_ids=[1], max_tokens=4), "prompt"),
    (dict(prompt_token_ids=[1] * 2048, max_tokens=4), "prompt_token_ids"),
    (dict(prompt="abc", max_tokens=4000), "max_tokens"),
    (dict(prompt_token_ids=[1, 2], max_tokens=0), "max_tokens"),
    (dict(prompt_token_ids=[1, 2], max_tokens=-3), "max_tokens"),
    (dict(prompt_token_ids=[1, 2], max_tokens=4, temperature=-0.5), "temperature"),
    (dict(prompt_token_ids=[1, 2], max_tokens=4, top_p=0.0), "top_p"),
    (dict(prompt_token_ids=[1, 2], max_tokens=4, top_p=1.5), "top_p"),
    (dict(prompt_token_ids=[1, 2], max_tokens=4, top_k=-1), "top_k"),
    (dict(prompt_token_ids=[1, 4096], max_tokens=4), "prompt_token_ids"),
    (dict(prompt_token_ids=[-2, 1], max_tokens=4), "prompt_token_ids"),
    (dict(prompt_token_ids=[1, 2], max_tokens=4, speculative_tokens=-2), "speculative_tokens"),
    (dict(prompt_token_ids=[1, 2], max_tokens=4, stop=[""]), "stop"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_requests_name_the_field(stub, fields, field):
    code, details = status_of(stub, pb.GenerateRequest(**fields))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details, details


def test_full_queue_is_resource_exhausted(model_dir):
    server = start_gateway(model_dir, max_queued=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.GatewayStub(ch)
            long_call = stub.Generate(pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=LONG), timeout=30)
            assert next(long_call).token_ids
            code, details = status_of(stub, pb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=2))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            long_call.cancel()
            wait_all_blocks_free(server)
            assert collect(stub, pb.GenerateRequest(prompt_token_ids=[1, 2], max_tokens=2))[2].usage
    finally:
        server.stop(0.0)


def test_cancelling_a_stream_frees_its_kv_blocks(gateway, stub):
    call = stub.Generate(pb.GenerateRequest(prompt="def run():", max_tokens=LONG), timeout=30)
    received = [next(call) for _ in range(3)]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in received)
    stats = gateway.runner.stats()
    assert stats.num_free_blocks < stats.num_blocks
    call.cancel()
    wait_all_blocks_free(gateway)


def test_short_deadline_is_deadline_exceeded_and_frees_blocks(gateway, stub):
    code, _ = status_of(stub, pb.GenerateRequest(prompt="def run():", max_tokens=LONG), timeout=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_all_blocks_free(gateway)


def test_engine_failure_fails_open_streams_with_unavailable(model_dir):
    server = start_gateway(model_dir, max_queued=4)
    engine, real_step, steps = server.runner.engine, server.runner.engine.step, []

    def failing_step():
        steps.append(1)
        if len(steps) > 3:
            raise RuntimeError("simulated device error")
        return real_step()

    engine.step = failing_step
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.GatewayStub(ch)
            code, details = status_of(stub, pb.GenerateRequest(prompt_token_ids=[5, 6], max_tokens=LONG))
            assert code == grpc.StatusCode.UNAVAILABLE and "simulated device error" in details
            code, details = status_of(stub, pb.GenerateRequest(prompt_token_ids=[5, 6], max_tokens=2))
            assert code == grpc.StatusCode.UNAVAILABLE, details
    finally:
        server.stop(0.0)


def test_health_model_info_and_reflection(gateway, channel, stub, model_dir):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tandem.v1.Gateway"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
    assert (info.model_name, info.max_context_tokens, info.vocab_size, info.num_mtp_layers) == ("tiny", 2048, 4096, 2)
    assert (info.num_routed_experts, info.num_moe_layers) == (16, 3)

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=5)
    names = {s.name for s in reply.list_services_response.service}
    assert {"tandem.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_shutdown_turns_health_not_serving_and_cancels_in_flight(model_dir):
    server = start_gateway(model_dir, max_queued=4)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        call = pb_grpc.GatewayStub(ch).Generate(pb.GenerateRequest(prompt_token_ids=[9, 8], max_tokens=LONG),
                                                timeout=30)
        next(call)
        stopper = threading.Thread(target=server.stop, args=(0.2,))
        stopper.start()
        last = None
        for last in call:
            pass
        stopper.join()
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED
        status = server.health._server_status.get("tandem.v1.Gateway")
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_of_the_colocated_gateway(model_dir):
    port = free_port()
    server = start_gateway(model_dir, max_queued=4, metrics_port=port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = pb_grpc.GatewayStub(ch)
            idle = scrape(port)
            assert (idle["tandem_kv_blocks_used"], idle["tandem_kv_blocks_total"]) == \
                (0, server.runner.stats().num_blocks)
            done = [collect(stub, pb.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=20, speculative_tokens=2))
                    for _ in range(2)]
            status_of(stub, pb.GenerateRequest(prompt_token_ids=[1], max_tokens=0))
            call = stub.Generate(pb.GenerateRequest(prompt_token_ids=[9, 8], max_tokens=LONG), timeout=30)
            next(call)
            assert scrape(port)["tandem_kv_blocks_used"] > 0
            call.cancel()
            wait_all_blocks_free(server)
            deadline = time.monotonic() + 5
            while (m := scrape(port)).get('tandem_requests_total{code="CANCELLED"}') != 1:
                assert time.monotonic() < deadline, "the cancelled call was not counted"
                time.sleep(0.05)
    finally:
        server.stop(0.0)
    assert (m['tandem_requests_total{code="OK"}'], m['tandem_requests_total{code="INVALID_ARGUMENT"}']) == (2, 1)
    assert m["tandem_request_latency_seconds_count"] == 4 and m["tandem_time_to_first_token_seconds_count"] == 3
    assert m["tandem_prompt_tokens_total"] == 3 + 3 + 2
    assert m["tandem_generation_tokens_total"] >= 40 + 1
    assert m["tandem_kv_blocks_used"] == 0
    assert m['tandem_queue_requests{state="waiting"}'] == m['tandem_queue_requests{state="running"}'] == 0
    # the steps are timed: 20 tokens at most 3 a step (2 drafts accepted + 1) take 7 steps at least
    steps = m['tandem_engine_step_seconds_count{phase="colocated"}']
    assert steps >= 7 and m['tandem_engine_step_seconds_sum{phase="colocated"}'] > 0
    spec = server.runner.engine.spec_totals
    assert sum(last.usage.num_draft_tokens for _, _, last in done) <= spec.draft_tokens  # + the cancelled one's
    assert (m["tandem_spec_draft_tokens_total"], m["tandem_spec_accepted_tokens_total"]) == \
        (spec.draft_tokens, spec.accepted_tokens)
    positions = range(len(spec.proposed_by_position))  # adaptive speculation may never have drafted two
    assert len(positions) >= 1
    assert [m[f'tandem_spec_draft_tokens_by_position_total{{position="{j}"}}'] for j in positions] == \
        spec.proposed_by_position
    assert [m[f'tandem_spec_accepted_tokens_by_position_total{{position="{j}"}}'] for j in positions] == \
        spec.accepted_by_position
    assert {int(name.split('"')[1]): v for name, v in m.items() if name.startswith("tandem_spec_policy_drafts{")} \
        == dict(server.runner.engine.policy.settled_choices())


def test_gateway_flags(model_dir):
    parser = argparse.ArgumentParser()
    add_gateway_parser(parser.add_subparsers(dest="service"))
    args = parser.parse_args(["gateway", "--model", str(model_dir), "--port", "0", "--host", "127.0.0.1",
                              "--max-queued", "3", "--num-speculative-tokens", "1", "--dtype", "float32",
                              "--device", "cpu", "--max-num-seqs", "4", "--metrics-port", "0"])
    config = build_config(GatewayConfig, "gateway", args, {"TANDEM_GATEWAY_GRACE_S": "2.5"})
    assert (config.port, config.max_queued, config.num_speculative_tokens, config.max_num_seqs, config.grace_s,
            config.metrics_port) == (0, 3, 1, 4, 2.5, 0)
    assert callable(args.func)
    server = GatewayServer.from_config(config).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            info = pb_grpc.GatewayStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert info.model_name == model_dir.name and server.runner.max_queued == 3
    finally:
        server.stop(0.0)


SERVE = """
import argparse, os, sys
from services.gateway.server import add_gateway_parser
parser = argparse.ArgumentParser()
add_gateway_parser(parser.add_subparsers(dest="service"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_serve_until_sigterm(model_dir):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), TANDEM_GATEWAY_GRACE_S="0.5")
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "gateway", "--model", str(model_dir), "--host",
                             "127.0.0.1", "--port", str(port), "--max-queued", "2"], env=env)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while True:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service="tandem.v1.Gateway"), timeout=1)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "the gateway did not become SERVING"
                time.sleep(0.1)
            call = pb_grpc.GatewayStub(ch).Generate(pb.GenerateRequest(prompt="def run():", max_tokens=LONG),
                                                    timeout=30)
            next(call)
            proc.send_signal(signal.SIGTERM)
            last = None
            for last in call:
                pass
            assert last.finish_reason == pb.FINISH_REASON_CANCELLED
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
