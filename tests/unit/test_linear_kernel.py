"""The CPU kernel of a linear layer over a few rows (`tandem.kernels.linear`) against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import library, linear, tiles
from tandem.model.layout import column_major


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def layer(in_features: int, out_features: int, dtype: torch.dtype) -> linear.Linear:
    torch.manual_seed(0)
    module = linear.Linear(in_features, out_features).to(dtype).requires_grad_(False)
    module.weight.data = column_major(module.weight.data)  # the CPU decoding layout
    module.pack_tiles_()
    return module


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("out_features", [160, 80, 16])  # whole blocks of 32 columns, then one zero-padded
@pytest.mark.parametrize("in_features", [96, 97])  # bfloat16 rows packed in pairs, or one after another
def test_the_kernel_multiplies_as_f_linear(dtype, tolerance, rows, out_features, in_features):
    module = layer(in_features, out_features, dtype)
    x = (torch.randn(rows + 5, 128)[5:, :in_features]).to(dtype)  # rows strided in memory
    with torch.no_grad():
        assert linear.runs(x, module.weight, module.tiles)
        got = module(x)
    want = x.float() @ module.weight.float().t()
    assert got.dtype == dtype and got.shape == (rows, out_features)
    assert float((got.float() - want).norm() / want.norm()) < tolerance


def test_a_packed_weight_holds_every_value_once_and_zeros_past_the_output_size():
    weight = torch.arange(80 * 6, dtype=torch.float32).view(80, 6) + 1
    for w in (weight, weight.bfloat16()):
        packed = tiles.pack(w)
        assert packed.shape == (3, 6, 32) and packed.is_contiguous()
        values = packed.flatten().float()
        assert sorted(values[values != 0].tolist()) == sorted(w.float().flatten().tolist())
        assert int((values == 0).sum()) == 16 * 6  # the last block's 16 columns past 80
    block = tiles.pack(weight)[0]  # float32 rows lie one after another: [in, 32 columns]
    torch.testing.assert_close(block, weight[:32].t())


def test_what_the_kernel_does_not_serve_runs_as_f_linear(monkeypatch):
    module = layer(64, 64, torch.float32)
    x = torch.randn(3, 64)
    many = torch.randn(linear.MAX_ROWS + 1, 64)
    unpacked = linear.Linear(64, 64)
    odd = layer(64, 40, torch.float32)
    with torch.no_grad():
        assert not linear.runs(many, module.weight, module.tiles)  # a prompt's rows: oneDNN's matmul
        assert not linear.runs(x, unpacked.weight, unpacked.tiles) and odd.tiles is None
        assert not linear.runs(x.bfloat16(), module.weight, module.tiles)
        torch.testing.assert_close(odd(x), F.linear(x, odd.weight))
    module.requires_grad_(True)
    assert not linear.runs(x, module.weight, module.tiles)  # training wants the weight's gradient
    module(x).sum().backward()
    assert module.weight.grad is not None
    monkeypatch.setattr(library, "_loaded", False)
    assert not linear.runs(x, module.weight, module.tiles)
    assert layer(64, 64, torch.float32).tiles is None  # nothing to pack with


def test_bad_inputs_get_clear_errors():
    module = layer(64, 64, torch.float32)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match=r"packed for the tiles \(\[\.\.\., 2, 64, 32\], contiguous\), got \[64, 64\]"):
        torch.ops.tandem.linear(x, module.weight, 64)
    with pytest.raises(RuntimeError, match="multiple of 16, got 40"):
        torch.ops.tandem.linear(x, module.tiles, 40)
    with pytest.raises(RuntimeError, match="weight must be a weight of 64 x 64 BFloat16"):
        torch.ops.tandem.linear(x.bfloat16(), module.tiles, 64)
    with pytest.raises(RuntimeError, match="pack takes a weight"):
        tiles.pack(torch.ones(4))


def test_converting_a_packed_module_drops_its_packing_which_holds_for_one_dtype():
    """bfloat16 rows are packed in pairs, float32 ones are not: a packing cast along with its module would be read
    wrong, so converting drops it (and packing again restores the kernel)."""
    module = layer(96, 64, torch.float32)
    assert module.tiles is not None
    module.to(torch.bfloat16)
    x = torch.randn(3, 96).bfloat16()
    with torch.no_grad():
        assert module.tiles is None and not linear.runs(x, module.weight, module.tiles)
        torch.testing.assert_close(module(x), F.linear(x, module.weight))
        assert module.pack_tiles_() and linear.runs(x, module.weight, module.tiles)
        torch.testing.assert_close(module(x), F.linear(x, module.weight), rtol=2e-2, atol=2e-2)
