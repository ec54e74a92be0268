"""The gateway in worker mode (`WorkerBackend`) in front of a real world: a controller in the test process, prefill
and decode workers and two expert servers as processes (real gloo), the gateway in-process. Concurrent greedy
streams equal the colocated engine's tokens; a client cancelling mid-way frees the decode worker's KV blocks;
health is SERVING."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.gateway.server import GatewayConfig, GatewayServer
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.gateway.workers import WorkerBackend
from tandem.model.loading import load_model
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import gateway_pb2 as gpb
from tandem.v1 import gateway_pb2_grpc as gpb_grpc
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc as pb_grpc
from worker_world import NUM_KV_BLOCKS, config, health, start_world, wait_serving

# (prompt, max_tokens, GenerateRequest.speculative_tokens: -1 none, 0 the server's default)
REQUESTS = [([5, 9, 3, 11, 2], 12, 1), (list(range(1, 18)), 10, -1), ([7, 7, 7] + list(range(40, 60)), 14, 0),
            ([42], 8, 1)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_world(tmp_path_factory.mktemp("gateway-workers")) as world:
        yield world


def test_gateway_over_workers(cluster):
    ckpt, controller, procs, logs = cluster
    colocated = Engine(load_model(ckpt), EngineConfig(num_speculative_tokens=1, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate([r[0] for r in REQUESTS],
                                                        [SamplingParams(max_tokens=r[1]) for r in REQUESTS])]
    members = wait_serving(controller, procs, logs)
    gateway = GatewayServer.from_config(GatewayConfig(model=str(ckpt), controller=f"127.0.0.1:{controller.port}",
                                                      host="127.0.0.1", port=0, max_queued=8, grace_s=0.0)).start()
    backend = gateway.runner
    assert isinstance(backend, WorkerBackend) and backend.num_speculative_tokens == 1  # the model's MTP depth
    channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")
    stub = gpb_grpc.GatewayStub(channel)
    decode_ch = grpc.insecure_channel(members[cpb.ROLE_DECODE].address)
    decode = pb_grpc.DecodeWorkerStub(decode_ch)
    try:
        assert health(f"127.0.0.1:{gateway.port}") == health_pb2.HealthCheckResponse.SERVING
        assert stub.GetModelInfo(gpb.GetModelInfoRequest()).max_context_tokens == config().max_position_embeddings

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
        assert sum(ms[-1].usage.num_draft_tokens for ms in results) > 0, "the decode worker drafts with MTP"
        assert decode.GetLoad(pb.GetLoadRequest()).num_free_kv_blocks == NUM_KV_BLOCKS

        # a client that cancels mid-way: the gateway cancels on the decode worker, which frees the blocks at once
        stream = stub.Generate(gpb.GenerateRequest(prompt_token_ids=list(range(1, 30)), max_tokens=200,
                                                   speculative_tokens=1), timeout=60)
        next(stream)
        deadline = time.monotonic() + 5
        while decode.GetLoad(pb.GetLoadRequest()).num_free_kv_blocks == NUM_KV_BLOCKS:
            assert time.monotonic() < deadline, "the request never reached the decode worker"
            time.sleep(0.02)
        stream.cancel()
        deadline = time.monotonic() + 5
        while (load := decode.GetLoad(pb.GetLoadRequest())).num_free_kv_blocks < NUM_KV_BLOCKS:
            assert time.monotonic() < deadline, "cancelled sequence's KV blocks not freed"
            time.sleep(0.05)
        assert load.num_running_sequences == 0
        while backend.num_open:  # the request's thread saw its Decode call end
            assert time.monotonic() < deadline, "the gateway still holds the cancelled request"
            time.sleep(0.05)
    finally:
        channel.close()
        decode_ch.close()
        gateway.stop(0)

    for name in ("prefill", "decode"):
        procs[name].send_signal(signal.SIGTERM)
    for name, p in procs.items():  # the expert servers end once both workers released them
        assert p.wait(timeout=30) == 0, f"{name}: {logs[name].read_text()[-3000:]}"
