"""The CPU kernels of SwiGLU feed-forward layers: a MoE layer's routed experts, each run on just the tokens routed
to it, and a dense MLP (a dense layer's, or a MoE layer's shared experts).

As tensor operations on the CPU, a decode step's feed-forward layers are a few dozen matmuls of a handful of rows,
and oneDNN's bfloat16 matmuls cost 15-30 us each whatever their size (on a 2-core EPYC, Zen 4). Worse, the routed
experts ran one of two ways, both slow at a step's few tokens: eagerly, one matmul per expert in use for each
projection; compiled, past a few tokens, every expert on every token (`ExpertBank._traceable`), two matmuls over all
the experts side by side, with P/K times the multiplies (4x for the bundled model's 16 experts, 4 active; 32x for
DeepSeek-V3's). The kernels (`ffn.cpp`) sort the (token, expert) pairs by expert and run each expert's projections
on its own rows, in register tiles of 8 rows x 32 columns, with `vdpbf16ps` in bfloat16 where the CPU has
AVX512-BF16, over weights packed for the tiles (`tandem.kernels.tiles`): the gate and up projections as (expert,
column block) tasks the threads split by rows, the down projection by column blocks, each summing its columns of
every token's experts; a dense MLP is one expert every token uses. On that EPYC, a bfloat16 MLP of 256 -> 384 ->
256 took 13 us against 60 us for its two matmuls at 1 row, 22 against 65 at 8 rows, 86 against 129 at 32; a
prompt's hundreds of rows keep the matmuls (`runs_mlp`). Summing in the down projection's tasks, where each pair's
output row was written out and summed in a pass of its own, took the bundled model's routed experts (16, 4 per
token) from 22 to 12-21 ms at 4096 tokens, 0.16-0.19 to 0.11-0.12 ms at 32 and 28-30 to 13-22 us at 1 (fastest of
each run, alternating).

They are part of the CPU kernels' library (`tandem.kernels.library`), loaded by CPU engines and expert servers.
Eager forwards call them, and so do compiled decode passes (`torch.export` traces the operators into AOTInductor's
libraries), unlike the layer operations (`layer_ops`), whose tensor form Inductor fuses well.
"""

from __future__ import annotations

import torch

from tandem.kernels import library
from tandem.kernels.linear import Linear
from tandem.kernels.tiles import packs, repack

COLUMNS = 32  # the kernels' tiles are 32 columns wide: the hidden and intermediate sizes must be multiples
# the most rows an eager dense MLP runs in the kernel: past about this many, oneDNN's matmuls were the faster (on a
# 2-core EPYC, Zen 4, bfloat16, 256 -> 768 -> 256: 684 against 679 us at 128 rows, 5.2 against 5.1 ms at 1024)
MLP_MAX_ROWS = 128

library.OPS.define("moe_experts(Tensor x, Tensor slot_ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor")
library.OPS.define("mlp(Tensor x, Tensor gate, Tensor up, Tensor down) -> Tensor")


@torch.library.register_fake("tandem::moe_experts")
def _(x, slot_ids, weights, gate_up, down):
    """The output's shape, for torch.export to trace the operator."""
    return x.new_empty(x.shape)


@torch.library.register_fake("tandem::mlp")
def _(x, gate, up, down):
    return x.new_empty(x.shape)


def pack_experts(gate_up: torch.Tensor, down: torch.Tensor, packed: tuple[torch.Tensor | None, torch.Tensor | None]) \
        -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A bank's stacked weights gate_up [P, 2I, D] and down [P, D, I] packed for the routed experts' kernel where it
    serves them (on the CPU, the library loaded, D and I multiples of `COLUMNS`), into `packed` where it holds an
    earlier packing (`repack`); else (None, None)."""
    if not (packs(gate_up) and down.shape[1] % COLUMNS == 0 and down.shape[2] % COLUMNS == 0):
        return None, None
    return repack(packed[0], gate_up), repack(packed[1], down)


def runs_mlp(x: torch.Tensor, gate: Linear, up: Linear, down: Linear) -> bool:
    """Whether the kernel runs a dense MLP of these projections on x [T, D]: their weights packed (`Linear.tiles`),
    D and I multiples of `COLUMNS`; x's rows contiguous, of their dtype, on the CPU, no gradient wanted, and T at
    most `MLP_MAX_ROWS` or the pass being compiled (a decode step's few rows, whose count a compiled pass must not
    branch on)."""
    packed = gate.tiles is not None and up.tiles is not None and down.tiles is not None
    return packed and x.dim() == 2 and x.stride(-1) == 1 and x.shape[1] % COLUMNS == 0 \
        and down.weight.shape[1] % COLUMNS == 0 and x.dtype == gate.tiles.dtype \
        and library.runs_on(x, gate.weight, up.weight, down.weight) \
        and (torch.compiler.is_compiling() or x.shape[0] <= MLP_MAX_ROWS)


def moe_experts(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum over its experts, as `ExpertBank.forward`: x [T, D], slot_ids [T, K] (local
    slots), weights [T, K], gate_up [P, 2I, D] and down [P, D, I] of x's dtype, packed (`pack_experts`)."""
    return torch.ops.tandem.moe_experts(x, slot_ids, weights, gate_up, down)


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [T, D] and nn.Linear weights gate, up [I, D] and down [D, I], packed
    (`tandem.kernels.tiles.pack`)."""
    return torch.ops.tandem.mlp(x, gate, up, down)
