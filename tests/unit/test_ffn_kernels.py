"""The CPU kernels of feed-forward layers (`tandem.kernels.ffn`) against their definitions in float32: a MoE
layer's routed experts (each token's experts one by one) and a dense SwiGLU MLP."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import ffn, library, tiles
from tandem.model.deepseek_v3 import MLP
from tandem.model.layout import use_decode_layout_
from tandem.moe.experts import ExpertBank

SLOTS, HIDDEN, INTER, TOP_K = 6, 64, 32, 3


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def bank_of(dtype: torch.dtype, seed: int = 0, slots: int = SLOTS, hidden: int = HIDDEN,
            inter: int = INTER) -> ExpertBank:
    """A bank in the CPU decoding layouts (`ExpertBank.from_weights`: side by side in bfloat16 and float16,
    column-major in float32)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate_proj": (slots, inter, hidden), "up_proj": (slots, inter, hidden),
              "down_proj": (slots, hidden, inter)}
    return ExpertBank.from_weights({n: (0.3 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()})


def routed(num_tokens: int, seed: int = 1, slots: int = SLOTS, top_k: int = TOP_K):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(slots, generator=g)[:top_k] for _ in range(num_tokens)]).reshape(-1, top_k)
    return ids, torch.rand(num_tokens, top_k, generator=g)


def definition(bank: ExpertBank, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """In float32 from the bank's (possibly rounded) values."""
    gate, up, down = (w.float() for w in (bank.gate_proj, bank.up_proj, bank.down_proj))
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for slot, w in zip(slots[t].tolist(), weights[t].tolist()):
            h = F.silu(gate[slot] @ x[t].float()) * (up[slot] @ x[t].float()) * w
            out[t] += down[slot] @ h
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


# float32 exactly as the definition's sums allow; bfloat16 and float16 round the intermediate and the output
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("num_tokens", [1, 2, 7, 40, 300])  # 300: many tiles of 8 rows per expert
def test_the_kernel_runs_each_tokens_experts_as_the_definition(dtype, num_tokens):
    bank = bank_of(dtype)
    x = torch.randn(num_tokens, HIDDEN).to(dtype)
    slots, weights = routed(num_tokens)
    with torch.no_grad():
        assert bank.runs_in_kernel and library.runs_on(x, bank.gate_up_proj, bank.down_proj)
        got = bank(x, slots, weights)
    assert got.dtype == dtype and got.shape == x.shape
    assert relative_error(got, definition(bank, x, slots, weights)) < TOLERANCE[dtype]


def test_the_kernel_reads_strided_rows_and_weights_of_any_float_dtype():
    bank = bank_of(torch.bfloat16, slots=16, hidden=96, inter=64)
    wide = torch.randn(20, 128).bfloat16()
    x = wide[:, :96]  # rows 128 apart
    slots, weights = routed(20, slots=16, top_k=4)
    with torch.no_grad():
        got = ffn.moe_experts(x, slots, weights.bfloat16(), bank.gate_up_tiles, bank.down_tiles)
        same = ffn.moe_experts(x.contiguous(), slots, weights.bfloat16(), bank.gate_up_tiles, bank.down_tiles)
    assert torch.equal(got, same)
    assert relative_error(got, definition(bank, x, slots, weights.bfloat16())) < 1e-2


def test_threads_split_the_work_without_changing_a_bit():
    """Each output element is summed by one task in one order, whatever the threads: bitwise the same."""
    bank = bank_of(torch.bfloat16, slots=16)
    x = torch.randn(64, HIDDEN).bfloat16()
    slots, weights = routed(64, slots=16, top_k=4)
    threads = torch.get_num_threads()
    with torch.no_grad():
        try:
            torch.set_num_threads(1)
            one = bank(x, slots, weights)
            torch.set_num_threads(3)
            three = bank(x, slots, weights)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, three)


def test_unused_experts_and_no_tokens_are_fine():
    bank = bank_of(torch.float32)
    with torch.no_grad():
        # every token on slots 0-2 only: slots 3-5 have no rows
        x = torch.randn(5, HIDDEN)
        slots, weights = torch.tensor([[0, 1, 2]] * 5), torch.rand(5, TOP_K)
        assert relative_error(bank(x, slots, weights), definition(bank, x, slots, weights)) < 1e-6
        empty = bank(torch.empty(0, HIDDEN), torch.empty(0, TOP_K, dtype=torch.int64), torch.empty(0, TOP_K))
    assert empty.shape == (0, HIDDEN)


def test_the_kernel_keeps_out_of_what_it_cannot_serve(monkeypatch):
    bank = bank_of(torch.float32)
    x = torch.randn(4, HIDDEN)
    # a gradient wanted (training); weights not packed (a bank not made for a CPU server or engine); sizes not
    # multiples of 32; the library not loaded
    assert not library.runs_on(x.requires_grad_(), bank.gate_up_proj, bank.down_proj)
    unpacked = ExpertBank(SLOTS, HIDDEN, INTER)
    assert not unpacked.runs_in_kernel and unpacked.max_gathered_tokens(TOP_K) == SLOTS // TOP_K
    narrow = bank_of(torch.float32, inter=24)
    assert not narrow.runs_in_kernel
    assert narrow.max_gathered_tokens(TOP_K) == SLOTS // TOP_K and bank.max_gathered_tokens(TOP_K) is None
    monkeypatch.setattr(library, "_loaded", False)
    assert not bank_of(torch.float32).runs_in_kernel


def test_torch_export_traces_the_kernel_into_the_graph():
    bank = bank_of(torch.bfloat16)
    x = torch.randn(8, HIDDEN).bfloat16()
    slots, weights = routed(8)
    with torch.no_grad():
        program = torch.export.export(bank, (x, slots, weights), strict=False)
        assert "tandem.moe_experts" in program.graph_module.code
        torch.testing.assert_close(program.module()(x, slots, weights), bank(x, slots, weights), rtol=0, atol=0)


def test_bad_inputs_get_clear_errors():
    bank = bank_of(torch.float32)
    x = torch.randn(3, HIDDEN)
    slots, weights = routed(3)
    gate_up, down = bank.gate_up_tiles, bank.down_tiles
    run = ffn.moe_experts
    with pytest.raises(RuntimeError, match="slot 6 outside the 6 slots"):
        run(x, slots.index_fill(1, torch.tensor([0]), SLOTS), weights, gate_up, down)
    with pytest.raises(RuntimeError, match="gate_up must be a weight of 64 x 64 BFloat16 packed for the tiles"):
        run(x.bfloat16(), slots, weights, gate_up, down)
    with pytest.raises(RuntimeError, match=r"slot_ids must be \[3, K\] int64"):
        run(x, slots.int(), weights, gate_up, down)
    with pytest.raises(RuntimeError, match="weights must be floats of slot_ids' shape"):
        run(x, slots, weights[:, :2], gate_up, down)
    with pytest.raises(RuntimeError, match=r"must be \[P, 2I, D\] and \[P, D, I\] packed for the tiles"):
        run(x, slots, weights, bank.gate_up_proj, bank.down_proj)  # as they lie, not packed
    narrow = bank_of(torch.float32, inter=24)
    with pytest.raises(RuntimeError, match="multiples of 32, got 64 and 24"):
        run(x, slots, weights, tiles.pack(narrow.gate_up_proj), tiles.pack(narrow.down_proj))
    with pytest.raises(RuntimeError, match=r"gate_up must be a weight of 64 x 64 Float .* got \[6, 2, 32, 32\]"):
        run(x, slots, weights, gate_up[:, :, :32], down)


def mlp_of(dtype: torch.dtype, hidden: int = HIDDEN, inter: int = 96, seed: int = 2) -> MLP:
    """A dense MLP in the CPU decoding layout (column-major weights), as `load_model` lays a CPU model out, its
    weights packed for the kernels, as a CPU engine packs them."""
    torch.manual_seed(seed)
    mlp = MLP(hidden, inter).to(dtype).requires_grad_(False)
    use_decode_layout_(mlp)
    tiles.pack_model_(mlp)
    return mlp


def mlp_definition(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    gate, up, down = (m.weight.float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return (F.silu(x.float() @ gate.t()) * (x.float() @ up.t())) @ down.t()


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("num_tokens", [1, 5, 128, 300])
def test_a_dense_mlp_runs_in_the_kernel_as_its_definition(dtype, num_tokens):
    mlp = mlp_of(dtype)
    projections = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    x = torch.randn(num_tokens, HIDDEN).to(dtype)
    with torch.no_grad():
        # eager forwards of more rows (prompts) keep the matmuls
        assert ffn.runs_mlp(x, *projections) == (num_tokens <= ffn.MLP_MAX_ROWS)
        got = ffn.mlp(x, *(p.tiles for p in projections))
        if num_tokens <= ffn.MLP_MAX_ROWS:
            assert torch.equal(mlp(x), got)  # the forward took the kernel
    assert got.dtype == dtype
    assert relative_error(got, mlp_definition(mlp, x)) < TOLERANCE[dtype]


def test_the_mlp_kernel_keeps_out_of_what_it_cannot_serve():
    x = torch.randn(3, HIDDEN)
    unpacked = MLP(HIDDEN, 96)
    assert not ffn.runs_mlp(x, unpacked.gate_proj, unpacked.up_proj, unpacked.down_proj)
    narrow = mlp_of(torch.float32, inter=48)  # each projection packs, but 48 is no multiple of 32
    assert narrow.gate_proj.tiles is not None and not ffn.runs_mlp(x, narrow.gate_proj, narrow.up_proj, narrow.down_proj)
    torch.testing.assert_close(narrow(x), mlp_definition(narrow, x), rtol=1e-5, atol=1e-5)
    mlp = mlp_of(torch.float32)
    torch.testing.assert_close(mlp(x), mlp_definition(mlp, x), rtol=1e-5, atol=1e-5)
    # training: the weights want gradients, which the kernel has none of
    mlp.requires_grad_(True)
    mlp(x).sum().backward()
    assert mlp.gate_proj.weight.grad is not None


def test_the_mlp_kernel_refuses_bad_weights_clearly():
    mlp = mlp_of(torch.float32)
    gate, up, down = mlp.gate_proj.tiles, mlp.up_proj.tiles, mlp.down_proj.tiles
    x = torch.randn(3, HIDDEN)
    with pytest.raises(RuntimeError, match="mlp's gate, up and down must be single weights packed for the tiles"):
        ffn.mlp(x, mlp.gate_proj.weight, up, down)
    with pytest.raises(RuntimeError, match="mlp's gate must be a weight of 96 x 64 BFloat16"):
        ffn.mlp(x.bfloat16(), gate, up, down)
    with pytest.raises(RuntimeError, match=r"mlp's up must be a weight of 96 x 64 Float .* got \[1, 64, 32\]"):
        ffn.mlp(x, gate, up[:1], down)
