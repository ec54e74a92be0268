"""MTP speculative decoding in the colocated engine: drafts, verification, rollback, policy."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.engine.speculative import SpeculationPolicy, StepCostModel
from tandem.model.attention_metadata import DenseCausal
from tandem.model.config import ModelConfig
from tandem.model.presets import random_model


def tiny_config(num_mtp: int) -> ModelConfig:
    return ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                       kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                       n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                       max_position_embeddings=256, num_nextn_predict_layers=num_mtp)


@pytest.fixture(scope="module", params=[1, 2], ids=["mtp1", "mtp2"])
def model(request):
    return random_model(tiny_config(request.param), seed=request.param, std=0.3)


PROMPTS = [[5, 9, 3, 11, 2], list(range(1, 18)), [7] * 3 + list(range(40, 70)), [42]]


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            hidden = model(torch.tensor(ids), DenseCausal.for_batch(1, len(ids)))
            ids.append(int(model.logits(hidden)[-1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def reference_drafts(model, tokens: list[int], k: int) -> list[int]:
    """Drafts recomputed from scratch with full (uncached) forwards, following the documented chain."""
    n, D = len(tokens), len(model.mtp_layers)
    dense = lambda length: DenseCausal.for_batch(1, length)  # noqa: E731
    prefix = torch.tensor(tokens[:-1])
    source = model.mtp_hidden_from_main(model(prefix, dense(n - 1)))  # positions 0..n-2
    drafts: list[int] = []
    for j in range(1, min(k, D) + 1):
        ext = tokens + drafts
        hidden = source
        for m in range(j):
            hidden = model.mtp_forward(m, torch.tensor(ext[m + 1:n + m]), hidden, dense(n - 1))
        drafts.append(int(model.mtp_logits(j - 1, hidden[-1:]).argmax()))
    if k > D:  # reuse the last module one position further on, fed its own output
        ext = tokens + drafts
        hidden_in = source
        for m in range(D - 1):
            hidden_in = model.mtp_forward(m, torch.tensor(ext[m + 1:n + m]), hidden_in, dense(n - 1))
        token_in = ext[D:n + D - 1]
        for _ in range(k - D):
            out = model.mtp_forward(D - 1, torch.tensor(token_in), hidden_in, dense(len(token_in)))
            hidden_in = torch.cat([hidden_in, out[-1:]])
            token_in = token_in + [drafts[-1]]
            out = model.mtp_forward(D - 1, torch.tensor(token_in), hidden_in, dense(len(token_in)))
            drafts.append(int(model.mtp_logits(D - 1, out[-1:]).argmax()))
    return drafts


def record_drafts(engine: Engine) -> list[tuple[list[int], list[int]]]:
    seen = []
    real = engine.drafter.advance

    def advance(seqs, main_hidden, counts, num_modules=None):
        real(seqs, main_hidden, counts, num_modules)
        seen.extend((list(s.token_ids), list(s.draft_ids)) for s in seqs if s.draft_ids)

    engine.drafter.advance = advance
    return seen


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_speculation_matches_plain_greedy_and_drafts_match_reference(model, k):
    engine = Engine(model, EngineConfig(num_speculative_tokens=k, adaptive_speculation=False, block_size=4,
                                        max_num_batched_tokens=12))
    seen = record_drafts(engine)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=12))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == greedy_reference(model, prompt, 12)
    assert seen, "the engine never drafted"
    for tokens, drafts in seen[:12]:
        assert drafts == reference_drafts(model, tokens, len(drafts))
    assert engine.num_free_blocks == engine.cache.allocator.num_blocks


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_accepted_and_rejected_drafts_roll_back_exactly(model, k):
    """Feed drafts that are right up to a random point: the output must still be plain greedy."""
    expected = {tuple(p): greedy_reference(model, p, 16) for p in PROMPTS}
    engine = Engine(model, EngineConfig(num_speculative_tokens=k, adaptive_speculation=False, block_size=4))
    rng = random.Random(k)
    real = engine.drafter.advance

    def oracle_draft(seqs, main_hidden, counts, num_modules=None):
        real(seqs, main_hidden, counts, num_modules)
        for seq in seqs:
            truth = expected[tuple(seq.token_ids[:seq.num_prompt_tokens])][seq.num_output_tokens:]
            good = rng.randint(0, len(seq.draft_ids))
            seq.draft_ids = truth[:good][: len(seq.draft_ids)] + [(t + 1) % 80 for t in truth[good:len(seq.draft_ids)]]
            seq.draft_ids = seq.draft_ids[: len(truth)] or seq.draft_ids

    engine.drafter.advance = oracle_draft
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=16))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == expected[tuple(prompt)]
    stats = engine.spec_totals.to_dict()
    assert stats["accepted_tokens"] > 0 and stats["accepted_tokens"] < stats["draft_tokens"]
    assert stats["mean_accepted_length"] > 1.0
    assert engine.num_free_blocks == engine.cache.allocator.num_blocks


def test_seeded_sampling_with_speculation_is_reproducible(model):
    def run():
        engine = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False))
        params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=s) for s in (1, 2, 3, 4)]
        return [o.token_ids for o in engine.generate(PROMPTS, params)]
    first, second = run(), run()
    assert first == second
    assert len({tuple(t) for t in first}) > 1


def test_abort_frees_blocks_at_once(model):
    engine = Engine(model, EngineConfig(num_speculative_tokens=2, block_size=4))
    total = engine.num_free_blocks
    rid = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=50))
    engine.step()
    engine.step()
    assert engine.num_free_blocks < total
    assert engine.abort(rid)
    assert engine.num_free_blocks == total
    assert not engine.has_unfinished
    assert not engine.abort(rid)


def test_preemption_recomputes_and_keeps_greedy_output(model):
    """A pool too small for every sequence at once forces preemption; outputs are unchanged."""
    engine = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False, block_size=4,
                                        num_kv_blocks=16))
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=20))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == greedy_reference(model, prompt, 20)


def measure(policy: SpeculationPolicy, batch_size: int, verify_seconds, draft_seconds) -> None:
    """Feed the policy the step times it asks for until it has tried every draft count."""
    for _ in range(100):
        if not policy.exploring(batch_size):
            return
        k = policy.choose(batch_size)
        policy.record_verify(k, batch_size, verify_seconds(k))
        policy.record_draft(k or None, batch_size, draft_seconds(k))  # as the engine: None for no MTP work
    raise AssertionError("the policy never stopped exploring")


@pytest.mark.parametrize("seed", range(6))
def test_any_sequence_of_draft_counts_keeps_greedy_output(seed):
    """Whatever the policy picks each step (drafts on, off, fewer modules than before, more than the checkpoint
    has), with chunked prefill and several requests: the output is plain greedy's and every block comes back."""
    rng = random.Random(seed)
    config = tiny_config(rng.choice([1, 2]))
    if seed % 3 == 2:
        config = replace(config, mtp_head_type="meta")
    model = random_model(config, seed=seed, std=0.3)
    max_drafts = config.num_nextn_predict_layers if config.mtp_head_type == "meta" else rng.choice([2, 3, 4])
    engine = Engine(model, EngineConfig(num_speculative_tokens=max_drafts, adaptive_speculation=False, block_size=4,
                                        max_num_batched_tokens=rng.choice([6, 12, 64])))
    engine.policy.choose = lambda batch_size: rng.randint(0, max_drafts)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=16))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == greedy_reference(model, prompt, 16)
    assert engine.num_free_blocks == engine.cache.allocator.num_blocks


def test_policy_tries_every_draft_count_then_turns_speculation_off_when_drafts_never_land():
    policy = SpeculationPolicy(max_drafts=3)
    tried = []
    for _ in range(100):
        if not policy.exploring(32):
            break
        k = policy.choose(32)
        tried.append(k)
        policy.record_verify(k, 32, 0.001 * 32 * (k + 1))  # cost proportional to tokens: verifying is not free
        policy.record_draft(k or None, 32, 0.0003 * 32 * k)
    assert set(tried) == {0, 1, 2, 3}
    for _ in range(200):  # steps in which no draft lands
        policy.observe(3, 0)
        policy.choose(batch_size=32)
    assert policy.choose(batch_size=32) == 0
    assert not policy.exploring(32)


def test_policy_drafts_when_passes_are_nearly_free_and_drafts_land():
    policy = SpeculationPolicy(max_drafts=3)
    measure(policy, 1, lambda k: 0.010 + 0.0001 * (k + 1), lambda k: 0.001 * k)  # fixed cost dominates at batch 1
    for _ in range(200):
        policy.observe(3, 3)
        policy.choose(batch_size=1)
    assert policy.choose(batch_size=1) == 3


def test_policy_counts_what_drafting_costs_not_only_the_verification():
    """Verifying drafts is free here, but producing each costs 60% of a step: with 80% acceptance one draft pays
    (1.8 tokens in 1.6 steps' time), two do not (2.44 tokens in 2.2)."""
    policy = SpeculationPolicy(max_drafts=3)
    measure(policy, 1, lambda k: 0.010, lambda k: 0.006 * k)
    policy.acceptance = [0.8, 0.8, 0.8]
    assert policy.choose(batch_size=1) == 1


def test_policy_turns_speculation_back_on_only_for_a_clear_gain():
    """Where it settled on no drafts, the policy needs 20% more tokens/s, not 2%, to draft again: the sequences
    whose MTP modules it skipped must recompute what they missed first."""
    policy = SpeculationPolicy(max_drafts=1)
    measure(policy, 8, lambda k: 0.010 * (1 + 0.6 * k), lambda k: 0.0)  # a step with a draft: 1.6x the time
    policy.acceptance = [0.5]  # 1.5 tokens in 1.6 steps' time
    assert policy.choose(8) == 0
    policy.acceptance = [0.85]  # 1.85 tokens: 15.6% more, not enough to switch back on
    assert policy.choose(8) == 0
    policy.acceptance = [1.0]  # 2 tokens: 25% more
    assert policy.choose(8) == 1
    policy.acceptance = [0.7]  # once on, 2% suffices to stay on (1.7 tokens: 6% more)
    assert policy.choose(8) == 1


def test_policy_with_drafts_off_follows_new_timings_of_drafting():
    """With drafts off, `choose` keeps the rates of drafting between steps; new samples of them (a request that pins
    its own draft count still drafts) still turn drafts back on."""
    policy = SpeculationPolicy(max_drafts=1)
    measure(policy, 8, lambda k: 0.010 * (1 + k), lambda k: 0.0)  # a step with a draft: twice the time
    policy.acceptance = [0.9]
    assert [policy.choose(8) for _ in range(3)] == [0, 0, 0]
    for _ in range(20):  # steps verifying one draft each, now as fast as plain ones
        policy.record_verify(1, 8, 0.010)
        policy.record_draft(1, 8, 0.0)
    assert policy.choose(8) == 1


def run_steps(policy: SpeculationPolicy, batch_size: int, steps: int, step_seconds) -> list[int]:
    """`steps` decode steps at the policy's choices, each taking step_seconds(k) (all of it verification)."""
    chosen = []
    for _ in range(steps):
        k = policy.choose(batch_size)
        chosen.append(k)
        policy.record_verify(k, batch_size, step_seconds(k))
        policy.record_draft(k or None, batch_size, 0.0)
    return chosen


def test_policy_measures_a_count_again_before_switching_to_it_on_old_timings():
    """One draft a step was run for a while, then acceptance fell and drafting stopped; meanwhile the shared
    machine slowed down. When acceptance recovers, the old timings of drafting look cheap next to the plain step's
    new ones: the policy measures drafting again before switching, finds it as slow, and stays off."""
    policy = SpeculationPolicy(max_drafts=1)
    speed = {"slowdown": 1.0}

    def step_seconds(k):  # a step with a draft: 1.7x the time of one without
        return 0.006 * speed["slowdown"] * (1 + 0.7 * k)

    measure(policy, 8, step_seconds, lambda k: 0.0)
    policy.acceptance = [1.0]  # 2 tokens in 1.7 steps' time
    assert run_steps(policy, 8, 20, step_seconds)[-16:] == [1] * 16  # drafting's cost: 16 steps at 10.2 ms
    policy.acceptance = [0.5]
    speed["slowdown"] = 1.5  # plain steps now take 9 ms
    assert run_steps(policy, 8, 2 * SpeculationPolicy.FRESH_STEPS, step_seconds)[-1] == 0
    policy.acceptance = [0.8]  # 1.8 tokens in 10.2 ms measured long ago (5.7 ms each) against 9 ms now
    chosen = run_steps(policy, 8, 100, step_seconds)
    # measured again (15.3 ms; the first step after the change does not count), never chosen
    assert chosen.count(1) == SpeculationPolicy.SAMPLES_TO_TRUST + 1
    assert chosen[-1] == 0


def test_policy_measures_smaller_counts_again_and_turns_drafts_off_when_they_stop_paying():
    """Drafts were chosen because the plain step was measured during a slow spell. Once every FRESH_STEPS steps
    the plain step is measured again, and found faster now, drafting stops."""
    policy = SpeculationPolicy(max_drafts=1)
    speed = {"slowdown": 2.0}

    def step_seconds(k):  # a step with a draft: 1.8x the time of one without
        return 0.006 * (speed["slowdown"] if k == 0 else 1.0) * (1 + 0.8 * k)

    measure(policy, 8, step_seconds, lambda k: 0.0)
    policy.acceptance = [0.8]  # 1.8 tokens in 1.8 plain steps' time: even, when measured side by side
    assert policy.choose(8) == 1  # against a plain step measured at twice its cost
    speed["slowdown"] = 1.0
    chosen = run_steps(policy, 8, 2 * SpeculationPolicy.FRESH_STEPS + 10, step_seconds)
    assert chosen[-1] == 0
    assert chosen[:SpeculationPolicy.FRESH_STEPS].count(1) == SpeculationPolicy.FRESH_STEPS


def test_acceptance_moves_one_step_at_a_time_whatever_the_batch_size():
    policy = SpeculationPolicy(max_drafts=2, prior_acceptance=0.5, decay=0.1)
    for _ in range(24):  # one step of 32 sequences: all land their first draft, 8 their second too
        policy.observe(2, 1)
    for _ in range(8):
        policy.observe(2, 2)
    policy.choose(32)
    # position 0: 32 of 32 landed; position 1: 8 of 32 (all reached it)
    assert policy.acceptance == pytest.approx([0.5 + 0.1 * (1.0 - 0.5), 0.5 + 0.1 * (0.25 - 0.5)])
    policy.choose(32)  # a step with no verification leaves it
    assert policy.acceptance == pytest.approx([0.55, 0.475])


def test_an_empty_batch_counts_as_batch_one():
    assert [SpeculationPolicy.bucket(b) for b in (0, 1, 2, 3, 4, 7, 8)] == [1, 1, 2, 2, 3, 3, 4]


def test_policy_stops_trying_a_draft_count_it_can_never_measure():
    """Requests that all ask for fewer drafts than the engine's maximum never verify that maximum: the policy
    gives up on it instead of exploring (and keeping the MTP caches warm) for ever."""
    policy = SpeculationPolicy(max_drafts=3)
    for _ in range(100):
        if not policy.exploring(4):
            break
        k = min(policy.choose(4), 1)  # every request drafts at most 1
        policy.record_verify(k, 4, 0.010 * (1 + k))
        policy.record_draft(k or None, 4, 0.001)
    assert not policy.exploring(4)
    policy.acceptance = [0.1, 0.1, 0.1]
    assert policy.choose(4) == 0


def test_policy_measures_each_batch_size_bucket_on_its_own():
    policy = SpeculationPolicy(max_drafts=2)
    measure(policy, 1, lambda k: 0.010, lambda k: 0.001 * k)  # batch 1: drafting is cheap
    policy.acceptance = [0.8, 0.8]
    assert policy.choose(1) == 2
    assert policy.exploring(32)  # a batch of 32 has not been measured: it is tried again from scratch
    measure(policy, 32, lambda k: 0.010 * (k + 1), lambda k: 0.004 * k)  # batch 32: compute-bound
    assert policy.choose(32) == 0
    assert policy.choose(1) == 2
    assert policy.settled_choices() == ((1, 2), (32, 0))  # what operators see: batch 1 drafts 2, 32-63 none


@torch.no_grad()
def test_meta_parallel_heads_draft_from_the_main_hidden_state():
    config = replace(tiny_config(2), mtp_head_type="meta")
    model = random_model(config, seed=5, std=0.3)
    for layer in model.mtp_layers:
        layer.eh_proj.weight[:, : config.hidden_size] = 0  # heads ignore the token input
    engine = Engine(model, EngineConfig(num_speculative_tokens=4, adaptive_speculation=False, block_size=4))
    seen = record_drafts(engine)
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=10))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == greedy_reference(model, prompt, 10)
    assert seen and all(len(d) <= 2 for _, d in seen), "parallel heads give at most one draft per head"
    for tokens, drafts in seen[:8]:
        n = len(tokens)
        main = model.mtp_hidden_from_main(model(torch.tensor(tokens[:-1]), DenseCausal.for_batch(1, n - 1)))
        expected = []
        for m in range(len(drafts)):
            out = model.mtp_forward(m, torch.tensor(tokens[1:n]), main, DenseCausal.for_batch(1, n - 1))
            expected.append(int(model.mtp_logits(m, out[-1:]).argmax()))
        assert drafts == expected


def run_with_scripted_policy(model, choices: list[int], watch) -> None:
    """Generate 24 tokens for PROMPTS[1] with the policy's choices scripted (then 2 drafts a step), calling
    watch(seq) after every step it is still running; the output must be plain greedy's."""
    engine = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False, block_size=4))
    script = iter(choices + [2] * 100)
    engine.policy.choose = lambda batch_size: next(script)
    seq = engine._requests[engine.add_request(PROMPTS[1], SamplingParams(max_tokens=24))][0]
    while engine.has_unfinished:
        engine.step()
        if not seq.is_finished:
            watch(seq)
    assert seq.output_ids == greedy_reference(model, PROMPTS[1], 24)


def test_one_draft_a_step_skips_the_second_module_which_resyncs_when_two_are_wanted_again():
    seen = {"lagged": False, "drafted_two_after": False}

    def watch(seq):
        seen["lagged"] |= seq.mtp[1].valid_len < seq.mtp[0].valid_len - 1
        seen["drafted_two_after"] |= seen["lagged"] and len(seq.draft_ids) == 2

    run_with_scripted_policy(random_model(tiny_config(2), seed=2, std=0.3), [2, 2, 1, 1, 1, 1, 1], watch)
    assert seen == {"lagged": True, "drafted_two_after": True}


def test_sequences_skipped_by_the_policy_resync_and_draft_again(model):
    """The policy turns drafting off for a while (sequences go stale), then on: output stays greedy and the
    stale sequences draft again after recomputing their lag."""
    seen = {"stale": False, "drafted_after": False}

    def watch(seq):
        seen["stale"] |= seq.mtp_stale
        seen["drafted_after"] |= seen["stale"] and bool(seq.draft_ids)

    run_with_scripted_policy(model, [2, 2, 0, 0, 0, 0], watch)
    assert seen == {"stale": True, "drafted_after": True}


def test_step_cost_model_fits_seconds_as_a_line_in_the_batch_size():
    model = StepCostModel(window=3)
    assert model.predict(4) == 0.0  # nothing measured
    for batch_size, seconds in [(9, 100.0), (1, 1.0), (3, 2.0), (5, 3.0)]:  # the first falls out of the window
        model.record(batch_size, seconds)
    assert model.predict(7) == pytest.approx(4.0) and model.predict(3) == pytest.approx(2.0)
    for seconds in (1.0, 2.0, 3.0):  # one batch size: the mean
        model.record(4, seconds)
    assert model.predict(4) == pytest.approx(2.0) and model.predict(40) == pytest.approx(2.0)
    for batch_size, seconds in [(1, 3.0), (2, 2.0), (3, 1.0)]:  # faster with more sequences is noise: flat
        model.record(batch_size, seconds)
    assert model.predict(1) == model.predict(30) == pytest.approx(2.0)


def test_step_cost_model_fit_follows_its_window_over_a_long_run_and_a_renewal():
    """The sums behind the fit are updated as samples enter and leave the window, not recomputed: after
    thousands of steps of varied sizes, and after `renew`, the fit is least squares over the window's samples."""
    rng = random.Random(0)
    model = StepCostModel(window=16)

    def least_squares(samples: list[tuple[int, float]], batch_size: int) -> float:
        slope, intercept = np.polyfit([b for b, _ in samples], [t for _, t in samples], 1)
        return max(slope, 0.0) * (batch_size - np.mean([b for b, _ in samples])) + np.mean([t for _, t in samples])

    for _ in range(5000):
        batch_size = rng.randint(1, 64)
        model.record(batch_size, rng.uniform(1e-4, 10.0) if rng.random() < 0.01 else 1e-3 * batch_size)
    window = list(model.samples)
    assert len(window) == 16
    assert model.predict(24) == pytest.approx(least_squares(window, 24), rel=1e-9)
    model.renew()
    assert model.predict(24) == pytest.approx(least_squares(window, 24), rel=1e-9)  # serves until a new sample
    model.record(8, 0.5)
    model.record(16, 0.7)
    assert list(model.samples) == [(8, 0.5), (16, 0.7)]
    assert model.predict(24) == pytest.approx(0.9)
