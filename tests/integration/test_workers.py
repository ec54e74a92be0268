"""`tandem serve prefill` and `tandem serve decode` as real processes, with a controller in the test process and
two expert servers as subprocesses (real gloo): the test plays the gateway (Decode first, then Prefill), and
the first token plus the streamed ones equal the colocated engine's greedy tokens; cancelling a stream frees
its KV blocks; health is SERVING on both workers; SIGTERM ends every process cleanly."""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from tandem.transport.handoff import HandoffStatus, pack_extras, unpack_extras
from tandem.engine.handoff import PrefilledSequence
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.loading import load_model
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import gateway_pb2 as gpb
from tandem.v1 import worker_pb2 as pb
from tandem.v1 import worker_pb2_grpc as pb_grpc
from worker_world import NUM_KV_BLOCKS, start_world, stop_gracefully, wait_serving

# (prompt, max_tokens, speculative tokens)
REQUESTS = [([5, 9, 3, 11, 2], 12, 1), (list(range(1, 18)), 10, 0), ([7, 7, 7] + list(range(40, 60)), 14, 1),
            ([42], 8, 1)]
transfer_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_world(tmp_path_factory.mktemp("workers")) as world:
        yield world


def sampling(max_tokens: int, spec: int) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, top_p=1.0, num_speculative_tokens=spec)


def generate(prefill, decode, members, request_id, prompt, params):
    """The gateway's protocol: open Decode (it posts the KV receive), then Prefill (it sends)."""
    transfer_id = next(transfer_ids)
    stream = decode.Decode(pb.DecodeRequest(request_id=request_id, prompt_token_ids=prompt, sampling=params,
                                            kv_transfer_id=transfer_id,
                                            prefill_rank=members[cpb.ROLE_PREFILL].rank), timeout=60)
    first = prefill.Prefill(pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, sampling=params,
                                              kv_transfer_id=transfer_id,
                                              decode_rank=members[cpb.ROLE_DECODE].rank), timeout=60)
    return first.first_token_id, stream


def test_prefill_and_decode_workers(cluster):
    ckpt, controller, procs, logs, _ = cluster
    colocated = Engine(load_model(ckpt), EngineConfig(num_speculative_tokens=1, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate([r[0] for r in REQUESTS],
                                                        [SamplingParams(max_tokens=r[1]) for r in REQUESTS])]
    members = wait_serving(controller, procs, logs)
    prefill_ch = grpc.insecure_channel(members[cpb.ROLE_PREFILL].address)
    decode_ch = grpc.insecure_channel(members[cpb.ROLE_DECODE].address)
    prefill, decode = pb_grpc.PrefillWorkerStub(prefill_ch), pb_grpc.DecodeWorkerStub(decode_ch)

    def run(i):
        prompt, max_tokens, spec = REQUESTS[i]
        first, stream = generate(prefill, decode, members, f"req-{i}", prompt, sampling(max_tokens, spec))
        messages = list(stream)
        return [first] + [t for m in messages for t in m.token_ids], messages

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(run, range(len(REQUESTS))))
    assert [tokens for tokens, _ in results] == expected
    for (tokens, messages), (_, max_tokens, spec) in zip(results, REQUESTS):
        assert messages[-1].finish_reason in (gpb.FINISH_REASON_STOP, gpb.FINISH_REASON_LENGTH)
        assert all(m.finish_reason == gpb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
        assert sum(m.num_accepted_draft_tokens for m in messages) <= sum(m.num_draft_tokens for m in messages)
        if spec == 0:
            assert sum(m.num_draft_tokens for m in messages) == 0
    assert sum(m.num_draft_tokens for _, ms in results for m in ms) > 0, "the decode worker drafts with MTP"

    load = decode.GetLoad(pb.GetLoadRequest())
    assert (load.num_free_kv_blocks, load.num_kv_blocks, load.num_running_sequences) == (NUM_KV_BLOCKS,) * 2 + (0,)
    assert load.HasField("num_mtp_modules_wanted")
    assert 0 <= load.num_mtp_modules_wanted <= len(colocated.model.mtp_layers)
    assert prefill.GetLoad(pb.GetLoadRequest()).num_queued_prompt_tokens == 0

    # cancelling the call mid-way, and the Cancel RPC, each free the sequence's KV blocks at once
    for how in ("call", "rpc"):
        params = pb.SamplingParams(max_tokens=200, top_p=1.0, stop_token_ids=[], num_speculative_tokens=1)
        _, stream = generate(prefill, decode, members, f"long-{how}", list(range(1, 30)), params)
        next(stream)
        assert decode.GetLoad(pb.GetLoadRequest()).num_free_kv_blocks < NUM_KV_BLOCKS
        if how == "call":
            stream.cancel()
        else:
            assert decode.Cancel(pb.CancelRequest(request_id=f"long-{how}")).is_found
            assert list(stream)[-1].finish_reason == gpb.FINISH_REASON_CANCELLED
        deadline = time.monotonic() + 5
        while decode.GetLoad(pb.GetLoadRequest()).num_free_kv_blocks < NUM_KV_BLOCKS:
            assert time.monotonic() < deadline, "cancelled sequence's KV blocks not freed"
            time.sleep(0.05)
    assert not decode.Cancel(pb.CancelRequest(request_id="long-rpc")).is_found

    # bad input is INVALID_ARGUMENT; a KV transfer that never comes is UNAVAILABLE, not a hang
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(pb.PrefillRequest(request_id="bad", prompt_token_ids=[1], sampling=sampling(4, 0),
                                          decode_rank=members[cpb.ROLE_PREFILL].rank))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "decode_rank" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id="bad", prompt_token_ids=[1], sampling=sampling(0, 0),
                                            prefill_rank=members[cpb.ROLE_PREFILL].rank)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in err.value.details()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        list(decode.Decode(pb.DecodeRequest(request_id="orphan", prompt_token_ids=[1, 2], sampling=sampling(4, 0),
                                            kv_transfer_id=next(transfer_ids),
                                            prefill_rank=members[cpb.ROLE_PREFILL].rank), timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 5
    # the receive left posted by that orphan takes the next handoff and hands it to its caller
    first, stream = generate(prefill, decode, members, "after-orphan", *REQUESTS[0][:1], sampling(12, 1))
    assert [first] + [t for m in stream for t in m.token_ids] == expected[0]

    # a decode worker that drafts nothing at its batch size asks for no MTP module: prefill hands none over, the
    # request decodes without drafts and its tokens do not change
    transfer_id = next(transfer_ids)
    prompt, params = REQUESTS[0][0], sampling(12, 1)
    stream = decode.Decode(pb.DecodeRequest(request_id="no-mtp", prompt_token_ids=prompt, sampling=params,
                                            kv_transfer_id=transfer_id, prefill_rank=members[cpb.ROLE_PREFILL].rank),
                           timeout=60)
    first = prefill.Prefill(pb.PrefillRequest(request_id="no-mtp", prompt_token_ids=prompt, sampling=params,
                                              kv_transfer_id=transfer_id, decode_rank=members[cpb.ROLE_DECODE].rank,
                                              num_mtp_modules=0), timeout=60).first_token_id
    messages = list(stream)
    assert [first] + [t for m in messages for t in m.token_ids] == expected[0]
    assert sum(m.num_draft_tokens for m in messages) == 0
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(pb.PrefillRequest(request_id="bad", prompt_token_ids=[1], sampling=sampling(4, 1),
                                          decode_rank=members[cpb.ROLE_DECODE].rank, num_mtp_modules=-1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mtp_modules" in err.value.details()
    prefill_ch.close()
    decode_ch.close()

    stop_gracefully(procs, logs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_handoff_extras_round_trip(dtype):
    generator = torch.Generator().manual_seed(7)
    sent = PrefilledSequence("r", [1, 2, 3], 9, torch.zeros(4, 3, 24, dtype=dtype), [2, 0],
                             torch.randn(2, 32).to(dtype), generator.get_state())
    got, has_kv = unpack_extras(pack_extras(HandoffStatus.CONTINUE, 9, sent), transfer_id=5)
    assert has_kv and (got.transfer_id, got.status, got.first_token, got.mtp_valid_lens) == (5, 0, 9, [2, 0])
    assert got.mtp_tails.dtype == dtype and torch.equal(got.mtp_tails, sent.mtp_tails)
    assert torch.equal(got.rng_state, sent.rng_state)
    unseeded = PrefilledSequence("r", [1], 4, torch.zeros(4, 1, 24), [], None, None)
    got, has_kv = unpack_extras(pack_extras(HandoffStatus.CONTINUE, 4, unseeded), transfer_id=6)
    assert has_kv and got.mtp_tails is None and got.rng_state is None and got.mtp_valid_lens == []
    got, has_kv = unpack_extras(pack_extras(HandoffStatus.STOP, 3, None), transfer_id=7)
    assert not has_kv and got.status is HandoffStatus.STOP and got.first_token == 3
