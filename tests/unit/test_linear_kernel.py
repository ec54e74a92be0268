"""The CPU kernel of a linear layer over a few rows (`tandem.kernels.linear`) against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import library, linear
from tandem.model.layout import column_major


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def layer(in_features: int, out_features: int, dtype: torch.dtype) -> linear.Linear:
    torch.manual_seed(0)
    module = linear.Linear(in_features, out_features).to(dtype).requires_grad_(False)
    module.weight.data = column_major(module.weight.data)  # the CPU decoding layout
    return module


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 5e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("out_features", [160, 80, 16])  # whole tiles of 32 columns, then a half one
def test_the_kernel_multiplies_as_f_linear(dtype, tolerance, rows, out_features):
    module = layer(96, out_features, dtype)
    x = (torch.randn(rows + 5, 128)[5:, :96]).to(dtype)  # rows strided in memory
    with torch.no_grad():
        assert linear.runs(x, module.weight)
        got = module(x)
    want = x.float() @ module.weight.float().t()
    assert got.dtype == dtype and got.shape == (rows, out_features)
    assert float((got.float() - want).norm() / want.norm()) < tolerance


def test_what_the_kernel_does_not_serve_runs_as_f_linear(monkeypatch):
    module = layer(64, 64, torch.float32)
    x = torch.randn(3, 64)
    many = torch.randn(linear.MAX_ROWS + 1, 64)
    row_major = linear.Linear(64, 64)
    odd = layer(64, 40, torch.float32)
    with torch.no_grad():
        assert not linear.runs(many, module.weight)  # a prompt's rows: oneDNN's matmul
        assert not linear.runs(x, row_major.weight) and not linear.runs(x, odd.weight)
        torch.testing.assert_close(odd(x), F.linear(x, odd.weight))
    module.requires_grad_(True)
    assert not linear.runs(x, module.weight)  # training wants the weight's gradient
    module(x).sum().backward()
    assert module.weight.grad is not None
    monkeypatch.setattr(library, "_loaded", False)
    assert not linear.runs(x, layer(64, 64, torch.float32).weight)


def test_bad_inputs_get_clear_errors():
    module = layer(64, 64, torch.float32)
    x = torch.randn(3, 64)
    with pytest.raises(RuntimeError, match="must be column-major"):
        torch.ops.tandem.linear(x, module.weight.contiguous())
    with pytest.raises(RuntimeError, match="multiple of 16, got 40"):
        torch.ops.tandem.linear(x, layer(64, 40, torch.float32).weight)
    with pytest.raises(RuntimeError, match=r"weight must be \[out, 64\] of x's dtype"):
        torch.ops.tandem.linear(x.bfloat16(), module.weight)
