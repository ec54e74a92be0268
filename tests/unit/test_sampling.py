"""Sampling parameters, target probabilities, seeded sampling and speculative-draft verification."""

import math

import pytest
import torch

from tandem.engine.sampling import (
    SamplingError,
    SamplingParams,
    greedy_tokens,
    make_generator,
    sample,
    target_probs,
    verify_drafts,
)

# --- SamplingParams -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.5),
        ("max_tokens", True),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "0.7"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", math.nan),
        ("top_k", -2),
        ("top_k", 3.0),
        ("seed", -1),
        ("seed", 2**64),
        ("seed", "42"),
        ("stop_token_ids", (1, -1)),
        ("stop_token_ids", ("eos",)),
        ("stop_token_ids", 2),
        ("stop", None),
        ("stop", ("",)),
        ("stop", ("ok", 7)),
        ("ignore_eos", "yes"),
    ],
)
def test_invalid_parameter_raises_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_tokens", 0, "max_tokens must be > 0, got 0"),
        ("temperature", -1.0, "temperature must be >= 0, got -1.0"),
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("top_k", -2, "top_k must be >= 0, got -2"),
    ],
)
def test_error_message_says_what_is_allowed(field, value, message):
    with pytest.raises(SamplingError) as error:
        SamplingParams(**{field: value})
    assert str(error.value) == message


def test_params_normalise_sequences_and_know_when_greedy():
    params = SamplingParams(temperature=1, stop_token_ids=[2, 3], stop=["</s>", "\n\n"])
    assert params.stop_token_ids == (2, 3)
    assert params.stop == ("</s>", "\n\n")
    assert params.temperature == 1.0 and not params.is_greedy
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams().is_greedy


# --- target_probs ---------------------------------------------------------------------------------


def test_greedy_rows_are_one_hot_at_the_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, -1.0, 2.0, 4.0]])
    probs = target_probs(logits, [SamplingParams()] * 2)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_top_k_one_equals_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    top1 = target_probs(logits, [SamplingParams(temperature=1.3, top_k=1)] * 8)
    assert torch.equal(top1, target_probs(logits, [SamplingParams()] * 8))


def test_top_k_keeps_the_k_largest_renormalised():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 0.0]])
    probs = target_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])
    expected = torch.zeros(1, 5)
    expected[0, [1, 3]] = torch.tensor([2.0, 1.0]).softmax(-1)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize(
    ("top_p", "top_k", "kept"),
    [
        (0.4, 0, [0]),  # the top token alone already has 0.5
        (0.7, 0, [0, 1]),  # 0.5 + 0.3 is the smallest set reaching 0.7
        (0.83, 0, [0, 1, 2]),
        (0.83, 3, [0, 1]),  # top-p acts after top-k: 0.5 + 0.3 is 0.84 of the remaining 0.95
        (1.0, 0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, top_k, kept):
    mass = torch.tensor([0.5, 0.3, 0.15, 0.05])
    probs = target_probs(mass.log()[None], [SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k)])[0]
    expected = torch.zeros(4)
    expected[kept] = mass[kept] / mass[kept].sum()
    torch.testing.assert_close(probs, expected)


def test_temperature_scales_logits_before_softmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    probs = target_probs(logits, [SamplingParams(temperature=0.7)] * 3)
    torch.testing.assert_close(probs, (logits / 0.7).softmax(-1))


def test_tiny_temperature_stays_finite():
    logits = torch.tensor([[10.0, 9.0, -5.0]])
    probs = target_probs(logits, [SamplingParams(temperature=1e-8)])
    assert torch.equal(probs, torch.tensor([[1.0, 0.0, 0.0]]))


def test_mixed_batch_matches_row_by_row():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, top_k=5),
        SamplingParams(temperature=1.2, top_p=0.6),
        SamplingParams(temperature=0.5),
    ]
    batched = target_probs(logits, params)
    for i, p in enumerate(params):
        torch.testing.assert_close(batched[i], target_probs(logits[i : i + 1], [p])[0])


def test_target_probs_rejects_a_params_count_mismatch():
    with pytest.raises(ValueError, match="N params"):
        target_probs(torch.zeros(3, 8), [SamplingParams()] * 2)


# --- sample ---------------------------------------------------------------------------------------


def test_one_hot_rows_sample_their_index():
    probs = torch.eye(6)[[4, 0, 5]]
    for seed in range(5):
        assert sample(probs, [make_generator(seed)] * 3).tolist() == [4, 0, 5]


def _draws(seeds, steps=20, vocab=1000):
    generators = [make_generator(s) for s in seeds]
    probs = torch.full((len(seeds), vocab), 1.0 / vocab)
    return torch.stack([sample(probs, generators) for _ in range(steps)], dim=1)


def test_same_seed_gives_the_same_samples():
    assert torch.equal(_draws([7, 8]), _draws([7, 8]))


def test_different_seeds_give_different_streams():
    draws = _draws([7, 8])
    assert not torch.equal(draws[0], draws[1])
    assert not torch.equal(_draws([None])[0], _draws([None])[0])


def test_a_seeded_row_does_not_depend_on_its_batch():
    alone = _draws([7])[0]
    assert torch.equal(_draws([1, 7, 3])[1], alone)


# --- verify_drafts, greedy ------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_drafter", [False, True])
def test_greedy_verification_emits_the_target_argmax_chain(sampling_drafter):
    # B rows, K drafts, V vocab
    b, k, v = 6, 4, 50
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(b * (k + 1), v, generator=gen)
    target = target_probs(logits, [SamplingParams()] * (b * (k + 1))).view(b, k + 1, v)
    chain = target.argmax(-1)
    matching = torch.tensor([0, 1, 2, 3, 4, 4])
    draft_ids = torch.randint(0, v, (b, k), generator=gen)
    for row, m in enumerate(matching.tolist()):
        draft_ids[row, :m] = chain[row, :m]
        if m < k:
            draft_ids[row, m] = (chain[row, m] + 1) % v
    draft_probs = torch.randn(b, k, v, generator=gen).softmax(-1) if sampling_drafter else None

    for seeds in ([0] * b, range(100, 100 + b)):
        num_accepted, tokens = verify_drafts(target, draft_probs, draft_ids, [make_generator(s) for s in seeds])
        assert torch.equal(num_accepted, matching)
        for row, m in enumerate(matching.tolist()):
            assert tokens[row, : m + 1].tolist() == chain[row, : m + 1].tolist()
            assert tokens[row, m + 1 :].tolist() == [-1] * (k - m)


def test_no_drafts_samples_from_the_target():
    target = torch.eye(5)[[3, 1]][:, None]  # [2, 1, 5]
    num_accepted, tokens = verify_drafts(target, None, torch.empty(2, 0, dtype=torch.long), [None, None])
    assert num_accepted.tolist() == [0, 0]
    assert tokens.tolist() == [[3], [1]]


def test_verify_drafts_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="draft_ids"):
        verify_drafts(torch.rand(2, 3, 5), None, torch.zeros(2, 3, dtype=torch.long), [None, None])


# --- rejection sampling preserves the target distribution -----------------------------------------
#
# A 5-token vocabulary, fixed target distributions per position and a drafter that disagrees with
# them. Whatever the drafter proposes, the emitted tokens must follow the target: a chi-square
# goodness-of-fit test on many rows passes for `verify_drafts` and fails for plausible mistakes.

TARGET = torch.tensor(
    [
        [0.40, 0.25, 0.15, 0.12, 0.08],
        [0.10, 0.30, 0.05, 0.35, 0.20],
        [0.20, 0.20, 0.20, 0.20, 0.20],
    ]
)
DRAFTER = torch.tensor([[0.10, 0.15, 0.20, 0.25, 0.30], [0.30, 0.20, 0.20, 0.10, 0.20]])
ROWS = 40_000
ALPHA = 1e-3  # a correct sampler fails this one time in a thousand; seeds are fixed, so never here


def chi_square_p_value(counts, probs):
    """P(statistic >= observed) for an even number of degrees of freedom, where the tail has a closed form."""
    expected = probs.double() * counts.sum()
    x = float(((counts.double() - expected) ** 2 / expected).sum())
    dof = probs.numel() - 1
    if dof % 2:
        raise ValueError(f"closed form needs even degrees of freedom, got {dof}")
    term = total = 1.0
    for i in range(1, dof // 2):
        term *= x / 2 / i
        total += term
    return math.exp(-x / 2) * total


def emitted_token_p_values(verify, k, seed):
    """p-values of the first emitted token against TARGET[0], and of the first two against TARGET[0] x TARGET[1]."""
    gen = torch.Generator().manual_seed(seed)
    v = TARGET.shape[1]
    target = TARGET[: k + 1].expand(ROWS, k + 1, v)
    draft_probs = DRAFTER[:k].expand(ROWS, k, v)
    draft_ids = torch.empty(ROWS, k, dtype=torch.long)
    for j in range(k):
        draft_ids[:, j] = torch.multinomial(DRAFTER[j], ROWS, replacement=True, generator=gen)
    num_accepted, tokens = verify(target, draft_probs, draft_ids, [gen] * ROWS)
    first = tokens[:, 0]
    # A row that emitted one token gets its second from the next decode step, whose target is TARGET[1].
    second = torch.multinomial(TARGET[1], ROWS, replacement=True, generator=gen)
    if k:
        second = torch.where(num_accepted >= 1, tokens[:, 1], second)
    first_p = chi_square_p_value(torch.bincount(first, minlength=v), TARGET[0])
    joint = torch.outer(TARGET[0], TARGET[1]).flatten()
    joint_p = chi_square_p_value(torch.bincount(first * v + second, minlength=v * v), joint)
    return first_p, joint_p


def verify_with_flaw(flaw):
    """A straightforward re-implementation of the verification with one deliberate mistake (or none)."""

    def verify(target, draft_probs, draft_ids, generators):
        # B rows, K drafts, V vocab
        b, k = draft_ids.shape
        gen = generators[0]
        p_draft = target[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1)
        q_draft = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1)
        u = torch.rand(b, k, generator=gen)
        accepted = {
            "none": u < p_draft / q_draft,
            "resample_from_p": u < p_draft / q_draft,
            "always_accept": torch.ones_like(u, dtype=torch.bool),
            "accept_with_p": u < p_draft,  # forgets to divide by q(d)
        }[flaw]
        num_accepted = accepted.long().cumprod(-1).sum(-1)
        rows = torch.arange(b)
        p = target[rows, num_accepted]
        q = draft_probs[rows, num_accepted.clamp(max=k - 1)]
        rejected = (num_accepted < k)[:, None] & (flaw != "resample_from_p")
        emitted = torch.multinomial(torch.where(rejected, (p - q).clamp_min(0), p), 1, generator=gen)
        tokens = torch.cat([draft_ids, torch.full((b, 1), -1)], 1)
        tokens[torch.arange(k + 1) > num_accepted[:, None]] = -1
        return num_accepted, tokens.scatter_(1, num_accepted[:, None], emitted)

    return verify


@pytest.mark.parametrize("k", [0, 1, 2])
def test_rejection_sampling_preserves_the_target_distribution(k):
    first_p, joint_p = emitted_token_p_values(verify_drafts, k, seed=10 + k)
    assert first_p > ALPHA
    assert joint_p > ALPHA


@pytest.mark.parametrize("k", [1, 2])
def test_reference_verification_passes_the_same_test(k):
    # The control for the next test: the harness's own rule differs from the flawed ones by one line.
    first_p, joint_p = emitted_token_p_values(verify_with_flaw("none"), k, seed=20 + k)
    assert first_p > ALPHA
    assert joint_p > ALPHA


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("flaw", ["always_accept", "accept_with_p", "resample_from_p"])
def test_statistical_test_catches_a_wrong_acceptance_rule(flaw, k):
    first_p, joint_p = emitted_token_p_values(verify_with_flaw(flaw), k, seed=30 + k)
    assert first_p < ALPHA
    assert joint_p < ALPHA


def test_sample_follows_the_target_probabilities():
    logits = torch.tensor([1.0, 0.2, -0.5, 0.7, -2.0])
    probs = target_probs(logits.expand(ROWS, 5), [SamplingParams(temperature=0.8)] * ROWS)
    ids = sample(probs, [make_generator(5)] * ROWS)
    assert chi_square_p_value(torch.bincount(ids, minlength=5), (logits / 0.8).softmax(-1)) > ALPHA


def test_greedy_tokens_are_the_argmax_with_the_lowest_index_on_ties():
    logits = torch.randn(32, 4096, generator=torch.Generator().manual_seed(0))
    logits[3, [7, 900, 4000]] = 100.0  # a three-way tie
    want = logits.argmax(-1).tolist()
    assert want[3] == 7
    assert greedy_tokens(logits) == want
    assert greedy_tokens(logits.bfloat16()) == logits.bfloat16().argmax(-1).tolist()
    assert greedy_tokens(logits[:1]) == want[:1]
