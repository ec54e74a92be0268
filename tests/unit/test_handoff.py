"""Prefill on one engine, decode on another: the disaggregated path equals the colocated engine."""

import pytest

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.kv_cache import OutOfBlocks
from tandem.engine.sampling import SamplingError, SamplingParams
from tandem.model.presets import random_model
from test_speculative import PROMPTS, tiny_config


@pytest.fixture(scope="module", params=[1, 2], ids=["mtp1", "mtp2"])
def model(request):
    return random_model(tiny_config(request.param), seed=10 + request.param, std=0.3)


def disaggregated(model, prompts, params, k, mtp_modules=None):
    prefill = Engine(model, EngineConfig(num_speculative_tokens=k, adaptive_speculation=False, block_size=4,
                                         max_num_batched_tokens=10))
    decode = Engine(model, EngineConfig(num_speculative_tokens=k, adaptive_speculation=False, block_size=4))
    # occupies blocks, so the layouts differ; drafts nothing, so the decode engine's draft totals are the handed-over
    # requests'
    decode.add_request([1, 2, 3], SamplingParams(max_tokens=30), "other", num_speculative_tokens=0)
    ids = [prefill.add_request(p, sp, prefill_only=True, mtp_modules=mtp_modules) for p, sp in zip(prompts, params)]
    first = {}
    while prefill.has_unfinished:
        for out in prefill.step():
            assert not out.finished and out.is_prefilled and len(out.new_token_ids) == 1
            first[out.request_id] = out.new_token_ids[0]
            handoff = prefill.take_prefilled(out.request_id)
            sp = params[ids.index(out.request_id)]
            kept = len(model.mtp_layers) if mtp_modules is None or sp.seed is not None else mtp_modules
            assert len(handoff.mtp_valid_lens) == kept
            decode.add_prefilled(handoff, sp)
    assert prefill.num_free_blocks == prefill.cache.allocator.num_blocks
    rest = {rid: [] for rid in ids}
    while decode.has_unfinished:
        for out in decode.step():
            if out.request_id in rest:
                rest[out.request_id] += out.new_token_ids
    assert decode.num_free_blocks == decode.cache.allocator.num_blocks
    return [[first[rid]] + rest[rid] for rid in ids], decode


@pytest.mark.parametrize("k", [0, 1, 3])
def test_greedy_disaggregated_equals_colocated(model, k):
    params = [SamplingParams(max_tokens=14)] * len(PROMPTS)
    colocated = Engine(model, EngineConfig(num_speculative_tokens=k, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate(PROMPTS, params)]
    got, decode = disaggregated(model, PROMPTS, params, k)
    assert got == expected
    if k:
        assert decode.spec_totals.draft_tokens > 0, "the decode engine drafts from the handed-over MTP state"


@pytest.mark.parametrize("mtp_modules", [0, 1])
def test_prefill_catches_up_only_the_modules_decode_asks_for(model, mtp_modules):
    """A decode worker whose policy drafts fewer tokens than the checkpoint has modules asks the prefill worker for
    fewer modules: the handoff carries just those, the sequence drafts at most that many tokens a step, and the
    output is still plain greedy."""
    params = [SamplingParams(max_tokens=14)] * len(PROMPTS)
    colocated = Engine(model, EngineConfig())
    expected = [c.token_ids for c in colocated.generate(PROMPTS, params)]
    got, decode = disaggregated(model, PROMPTS, params, 3, mtp_modules)
    assert got == expected
    spec = decode.spec_totals
    # all of the checkpoint's modules (mtp1 asked for 1) is no limit: drafts past the last one reuse it
    assert len(spec.proposed_by_position) == (3 if mtp_modules == len(model.mtp_layers) else mtp_modules)
    assert (spec.draft_tokens > 0) == (mtp_modules > 0)


def test_seeded_sampling_keeps_every_module(model):
    """Seeded sampling replays only with the same draft counts: a prefill worker asked for no modules still hands
    them all over, and the stream is the colocated one."""
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=s) for s in (3, 4, 5, 6)]
    colocated = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate(PROMPTS, params)]
    got, _ = disaggregated(model, PROMPTS, params, 2, mtp_modules=0)
    assert got == expected


def settle_on_no_drafts(policy, batch_size: int = 1) -> None:
    """Measurements of a machine on which drafting costs more than it gains, at `batch_size`."""
    for k in range(policy.max_drafts + 1):
        for _ in range(policy.SAMPLES_TO_TRUST + 1):  # the first step of a count does not count
            policy.record_verify(k, batch_size, 0.01 * (1 + k))
            policy.record_draft(k or None, batch_size, 0.01)
    assert policy.choose(batch_size) == 0


def test_modules_asked_of_prefill_follow_the_policy(model):
    fixed = Engine(model, EngineConfig(num_speculative_tokens=1, adaptive_speculation=False))
    assert fixed.mtp_modules_for_arrival() == 1
    assert Engine(model, EngineConfig()).mtp_modules_for_arrival() == 0  # no speculation
    engine = Engine(model, EngineConfig(num_speculative_tokens=3))
    modules = len(model.mtp_layers)
    assert engine.mtp_modules_for_arrival() == modules  # nothing measured yet: every module
    settle_on_no_drafts(engine.policy)
    assert engine.mtp_modules_for_arrival() == 0
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=4))
    assert engine.mtp_modules_for_arrival() == modules, "batch size 2 is a bucket still to be measured"
    with pytest.raises(SamplingError, match="mtp_modules"):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=4), mtp_modules=-1)


def test_colocated_requests_catch_up_only_the_modules_the_policy_drafts_from(model):
    modules = len(model.mtp_layers)

    def settled_engine(batch_size: int = 1) -> Engine:
        engine = Engine(model, EngineConfig(num_speculative_tokens=2))
        settle_on_no_drafts(engine.policy, batch_size)
        return engine

    def kept(engine: Engine, rid: str) -> int:
        return len(engine._requests[rid][0].mtp)

    engine = settled_engine()
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=10))
    engine.step()  # its prefill starts: its modules are settled
    assert kept(engine, rid) == 0 and engine._requests[rid][0].max_drafts == 0
    plain = Engine(model, EngineConfig()).generate(PROMPTS[1:2], SamplingParams(max_tokens=10))[0].token_ids
    seq = engine._requests[rid][0]
    while engine.has_unfinished:
        engine.step()
    assert seq.output_ids == plain and engine.spec_totals.draft_tokens == 0
    # a burst decodes together: settled at batch size 3, three requests added at once keep no module, the first
    # one too, which arrived alone
    engine = settled_engine(batch_size=3)
    rids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in PROMPTS[:3]]
    engine.step()
    assert [kept(engine, r) for r in rids] == [0, 0, 0]
    # a batch size still to be measured: every module
    engine = settled_engine()
    rids = [engine.add_request(p, SamplingParams(max_tokens=10)) for p in PROMPTS[:2]]
    engine.step()
    assert [kept(engine, r) for r in rids] == [modules, modules]
    # seeded sampling drafts the same counts wherever it runs: every module, whatever the policy
    engine = settled_engine()
    rid = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=10, temperature=0.8, seed=3))
    engine.step()
    assert kept(engine, rid) == modules


def test_seeded_sampling_continues_the_same_stream(model):
    params = [SamplingParams(max_tokens=12, temperature=0.8, seed=s) for s in (3, 4, 5, 6)]
    colocated = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate(PROMPTS, params)]
    got, _ = disaggregated(model, PROMPTS, params, 2)
    assert got == expected


def test_handoff_errors(model):
    prefill = Engine(model, EngineConfig(num_speculative_tokens=1, block_size=4))
    rid = prefill.add_request(PROMPTS[1], SamplingParams(max_tokens=8), prefill_only=True)
    with pytest.raises(KeyError, match=rid):
        prefill.take_prefilled(rid)  # not prefilled yet
    while not prefill.step():
        pass
    handoff = prefill.take_prefilled(rid)
    decode = Engine(model, EngineConfig(num_speculative_tokens=1, block_size=4, num_kv_blocks=8))
    with pytest.raises(SamplingError, match="max_tokens"):
        decode.add_prefilled(handoff, SamplingParams(max_tokens=1))
    with pytest.raises(SamplingError, match="shape"):
        bad = type(handoff)(**{**{f: getattr(handoff, f) for f in handoff.__slots__}, "kv": handoff.kv[:, :-1]})
        decode.add_prefilled(bad, SamplingParams(max_tokens=8))
    decode.add_request(list(range(1, 21)), SamplingParams(max_tokens=4), "busy")
    decode.step()  # "busy" holds 5 of the 8 blocks
    free = decode.num_free_blocks
    with pytest.raises(OutOfBlocks):
        decode.add_prefilled(handoff, SamplingParams(max_tokens=8))  # its 18 tokens need 5 blocks of 4
    assert decode.num_free_blocks == free
    while decode.has_unfinished:
        decode.step()
    request_id = decode.add_prefilled(handoff, SamplingParams(max_tokens=8))  # fits once "busy" is done
    assert request_id == rid
