"""The expert bank's grouped execution against the definition: each token's experts run one by one."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import library
from tandem.model.layout import experts_side_by_side
from tandem.moe.experts import ExpertBank

NUM_SLOTS, HIDDEN, INTER, TOP_K = 6, 16, 8, 3


def definition(bank: ExpertBank, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot, w in zip(slots[t].tolist(), weights[t]):
            h = F.silu(F.linear(x[t], bank.gate_proj[slot])) * F.linear(x[t], bank.up_proj[slot])
            out[t] += w * F.linear(h, bank.down_proj[slot])
    return out


@pytest.fixture(params=["tensor ops", "kernels"])
def swiglu_in(request, monkeypatch):
    """silu(gate) * up in tensor operations, or in the CPU kernel."""
    if request.param == "kernels":
        request.getfixturevalue("cpu_kernels")
    else:
        monkeypatch.setattr(library, "_loaded", False)
    return request.param


@pytest.fixture
def bank() -> ExpertBank:
    torch.manual_seed(0)
    bank = ExpertBank(NUM_SLOTS, HIDDEN, INTER)
    for p in bank.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return bank


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 40])
def test_grouped_and_per_expert_paths_match_the_definition(bank, num_tokens, swiglu_in):
    x = torch.randn(num_tokens, HIDDEN)
    # every token picks distinct slots; with 40 tokens every slot is used, with 1 most are empty
    slots = torch.stack([torch.randperm(NUM_SLOTS)[:TOP_K] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, TOP_K)
    expected = definition(bank, x, slots, weights)
    with torch.no_grad():
        torch.testing.assert_close(bank(x, slots, weights), expected, rtol=1e-5, atol=1e-5)
        order = slots.reshape(-1).argsort(stable=True)
        per_expert = bank._per_expert(x.index_select(0, order // TOP_K), slots.reshape(-1)[order],
                                      weights.reshape(-1)[order])
        grouped = torch.zeros_like(x).index_add_(0, order // TOP_K, per_expert)
        torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
        if num_tokens == 1:  # the one-token path adds the same terms in the same order: bit for bit
            assert torch.equal(bank(x, slots, weights), grouped)


@pytest.mark.parametrize("num_tokens", [1, 2, 3, 40])
@pytest.mark.parametrize("layout", ["row_major", "column_major", "side_by_side"])
def test_the_path_torch_compile_traces_matches_the_definition(bank, num_tokens, layout):
    """`_traceable`, run eagerly: per-pair gathers while the pairs fit in the slots (1 and 2 tokens of 3 experts
    in 6 slots), every expert on every token past that (3 and 40): batched matmuls, or with the gate and up
    projections side by side, one matmul over every expert's weights."""
    if layout != "row_major":
        bank = ExpertBank.from_weights({n: getattr(bank, n).detach() for n in ("gate_proj", "up_proj", "down_proj")})
    if layout == "side_by_side":  # as a bfloat16 bank is laid out, here in float32 to compare tightly
        bank.gate_up_proj.data = experts_side_by_side(bank.gate_up_proj.data)
    assert bank._side_by_side == (layout == "side_by_side")
    x = torch.randn(num_tokens, HIDDEN)
    slots = torch.stack([torch.randperm(NUM_SLOTS)[:TOP_K] for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, TOP_K)
    with torch.no_grad():
        torch.testing.assert_close(bank._traceable(x, slots, weights), definition(bank, x, slots, weights),
                                   rtol=1e-5, atol=1e-5)


def test_no_tokens_give_an_empty_result(bank):
    out = bank(torch.empty(0, HIDDEN), torch.empty(0, TOP_K, dtype=torch.int64), torch.empty(0, TOP_K))
    assert out.shape == (0, HIDDEN)
