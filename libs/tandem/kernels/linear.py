"""The CPU kernel of a linear layer over a few rows, and `Linear`, the model's linear layer that runs it.

A decode step multiplies a handful of rows by each weight, and oneDNN's bfloat16 matmuls cost 15-30 us a call on a
2-core EPYC (Zen 4) whatever their size: at batch 1 the calls, not the multiplies, set a step's time. The kernel
(`linear.cpp`) runs the product in the register tiles the feed-forward kernels use (`tiles.h`), each 32-column
block of the output over every row, reading each block of the weight, packed for the tiles (`tandem.kernels.tiles`),
once. On that EPYC, in bfloat16, before the weights were packed: 6 against 28 us at 1 row of 256 -> 384, 20 against
36 us at 32 rows, 57 against 104 us for the bundled model's output head at 1 row. Packed, at 64 rows 41 against 63
us (256 -> 384) and 410 against 523 us (the output head); at 128 rows the two are about even (73 against 87 us, 866
against 794), and past 512 oneDNN's matmuls are the faster (the kernel does not block its rows for the cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import library
from tandem.kernels.tiles import HoldsTiles, packs, repack

COLUMNS = 16  # output sizes must be multiples of the kernel's 16-column vectors
MAX_ROWS = 64  # the most rows an eager call runs in the kernel: about where oneDNN's matmuls become as fast

library.OPS.define("linear(Tensor x, Tensor tiles, int out_features) -> Tensor")


@torch.library.register_fake("tandem::linear")
def _(x, tiles, out_features):
    return x.new_empty(x.shape[0], out_features)


def runs(x: torch.Tensor, weight: torch.Tensor, tiles: torch.Tensor | None) -> bool:
    """Whether the kernel runs x [rows, in] . weight^T: the weight packed (`tiles`, see `tandem.kernels.tiles`); x
    on the CPU with contiguous rows, at most `MAX_ROWS` of them unless compiled (a decode step's, whose count a
    compiled pass must not branch on), of the weight's dtype; no gradient wanted."""
    return tiles is not None and library.runs_on(x, weight) and x.dim() == 2 and x.stride(-1) == 1 \
        and x.dtype == tiles.dtype and (torch.compiler.is_compiling() or x.shape[0] <= MAX_ROWS)


def linear(x: torch.Tensor, weight: torch.Tensor, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight) without bias, in the CPU kernel over `tiles`, the weight packed, where it runs (`runs`)."""
    return torch.ops.tandem.linear(x, tiles, weight.shape[0]) if runs(x, weight, tiles) else F.linear(x, weight)


def pack_for_linear(weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor | None:
    """`weight` packed for the kernel where it serves it (on the CPU, the library loaded, its output size a multiple
    of `COLUMNS`), into `packed` where it holds an earlier packing (`repack`); else None."""
    return repack(packed, weight if packs(weight) and weight.shape[0] % COLUMNS == 0 else None)


class Linear(HoldsTiles, nn.Linear):
    """nn.Linear without bias, running the CPU kernel where it serves (`runs`), once `pack_tiles_` packed its weight
    (a buffer beside it, not in the state dict)."""

    TILES = ("tiles",)

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def pack_tiles_(self) -> bool:
        self.tiles = pack_for_linear(self.weight, self.tiles)
        return self.tiles is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.tiles)
