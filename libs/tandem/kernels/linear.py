"""The CPU kernel of a linear layer over a few rows, and `Linear`, the model's linear layer that runs it.

A decode step multiplies a handful of rows by each weight, and oneDNN's bfloat16 matmuls cost 15-30 us a call on a
2-core EPYC (Zen 4) whatever their size: at batch 1 the calls, not the multiplies, set a step's time. The kernel
(`linear.cpp`) runs the product in the register tiles the feed-forward kernels use (`tiles.h`), each 32-column
block of the output over every row, reading each weight column once. On that EPYC, in bfloat16: 6 against 28 us at
1 row of 256 -> 384, 20 against 36 us at 32 rows, 57 against 104 us for the bundled model's output head at 1 row;
at 128 rows the two are about even, and the output head's 4096 columns 876 against 725 us.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import library

COLUMNS = 16  # output sizes must be multiples of the kernel's 16-column vectors
MAX_ROWS = 64  # the most rows an eager call runs in the kernel: about where oneDNN's matmuls become as fast

library.OPS.define("linear(Tensor x, Tensor weight) -> Tensor")


@torch.library.register_fake("tandem::linear")
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernel runs x [rows, in] . weight^T: loaded; x on the CPU with contiguous rows, at most `MAX_ROWS`
    of them unless compiled (a decode step's, whose count a compiled pass must not branch on); the weight
    column-major (the CPU decoding layout) with an output size a multiple of `COLUMNS`; no gradient wanted."""
    return library.runs_on(x, weight) and x.dim() == 2 and x.stride(-1) == 1 \
        and weight.stride(0) == 1 and weight.shape[0] % COLUMNS == 0 and x.dtype == weight.dtype \
        and (torch.compiler.is_compiling() or x.shape[0] <= MAX_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) without bias, in the CPU kernel where it serves (`runs`)."""
    return torch.ops.tandem.linear(x, weight) if runs(x, weight) else F.linear(x, weight)


class Linear(nn.Linear):
    """nn.Linear without bias, running the CPU kernel where it serves (`runs`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)
