"""Weights packed for the CPU kernels' register tiles (`tiles.h`), and packing a model's.

The kernels (`linear`, `ffn`) multiply a few rows by a weight 32 output columns at a time. Read from the weight as
it lies (column-major, the CPU decoding layout), a block's rows are `out` elements apart: the hardware prefetchers
do not follow them across pages, and at power-of-two widths they share a few cache sets. Packed (`pack`), each
block is one contiguous stream, its rows in pairs where the CPU multiplies bfloat16 pairs (`vdpbf16ps`), so the
kernel interleaves nothing either. On a 2-core Zen 4 EPYC, one thread, bfloat16, the weights out of cache (24 copies
taken in turn), packed against as they lie: the output head (256 -> 4096) at 1 row 294 against 1391 us, at 32 rows
518 against 1359 us; 256 -> 384 at 1 row 15 against 64 us, at 32 rows 50 against 69 us; 1024 rows of 256 -> 4096
15 against 21 ms. With the weights in cache the two were within 7% but for the output head (1.6x).

The packed weight is a copy, made once the weights are final (`pack_model_`, by CPU engines and expert servers after
loading the kernels): a module that packs keeps it as a buffer beside its parameter, which keeps serving
checkpoints, the GPU and whatever the kernels do not run. Weights changed in place afterwards need packing again
(`pack_model_`), which writes over the packed buffers in place, so that compiled passes reading them follow;
converted modules (`.to`) drop theirs (`HoldsTiles`).
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.kernels import library

library.OPS.define("pack(Tensor weight) -> Tensor")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [..., out, in] (nn.Linear's layout, any strides) as the kernels read it: [..., ceil(out / 32), in, 32],
    output columns past `out` zero, the memory in the tiles' order (not indexable as [block, in, column] where rows
    are paired). The library must be loaded."""
    return torch.ops.tandem.pack(weight.detach())


def packs(weight: torch.Tensor) -> bool:
    """Whether a module packs this weight: the library loaded and the weight on the CPU."""
    return library.loaded() and weight.device.type == "cpu"


def repack(packed: torch.Tensor | None, weight: torch.Tensor | None) -> torch.Tensor | None:
    """`weight` packed (None: not packed), into `packed` in place where it holds a packing of the same shape: a
    compiled pass that reads it then reads the new values."""
    new = pack(weight) if weight is not None else None
    if packed is not None and new is not None and packed.shape == new.shape and packed.dtype == new.dtype:
        return packed.copy_(new)
    return new


class HoldsTiles(nn.Module):
    """A module keeping weights packed for the kernels in the buffers named `TILES` (`pack_tiles_`), None until
    packed and not in the state dict. Converting it (`.to`, `.float()`, `.cuda()`) drops them: a packing's layout
    holds for its dtype only (bfloat16 rows are paired, float32 ones not), and the kernels run on the CPU only. Pack
    again after."""

    TILES: tuple[str, ...] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in self.TILES:
            self.register_buffer(name, None, persistent=False)

    def _apply(self, fn, recurse=True):
        for name in self.TILES:
            setattr(self, name, None)
        return super()._apply(fn, recurse)


def pack_model_(model: nn.Module) -> int:
    """Pack the weights of every module of `model` that runs a kernel over them (those with `pack_tiles_`), where
    they are on the CPU and the library is loaded; returns how many modules packed."""
    return sum(bool(m.pack_tiles_()) for m in model.modules() if hasattr(m, "pack_tiles_"))
