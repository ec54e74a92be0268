"""The CPU kernel of a MoE layer's routed experts: each expert run on just the tokens routed to it.

As tensor operations on the CPU, a step's routed experts ran one of two ways, both slow at a decode step's few
tokens. Eagerly, one matmul per expert in use for each projection: a few dozen matmuls of a handful of rows, each
costing oneDNN about 15-20 us in bfloat16 whatever its size. Compiled, past a few tokens, every expert on every
token (`ExpertBank._traceable`), as two matmuls over all the experts side by side: no call costs, but P/K times
the multiplies (4x for the bundled model's 16 experts, 4 active; 32x for DeepSeek-V3's). The kernel
(`moe_experts.cpp`) sorts the (token, expert) pairs by expert and runs each expert's projections on its own
rows, in register tiles, with `vdpbf16ps` for bfloat16 where the CPU has AVX512-BF16, and threads splitting the
(expert, column block) tasks by rows.

It is part of the CPU kernels' library (`tandem.kernels.library`), loaded by CPU engines and expert servers.
Eager forwards call it, and so do compiled decode passes (`torch.export` traces the operator into AOTInductor's
libraries), unlike the layer operations (`layer_ops`), whose tensor form Inductor fuses well.
"""

from __future__ import annotations

import torch

from tandem.kernels import library

COLUMNS = 32  # the kernel's tiles are 32 columns wide: the hidden and intermediate sizes must be multiples

library.OPS.define("moe_experts(Tensor x, Tensor slot_ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor")


@torch.library.register_fake("tandem::moe_experts")
def _(x, slot_ids, weights, gate_up, down):
    """The output's shape, for torch.export to trace the operator."""
    return x.new_empty(x.shape)


def serves(gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the kernel serves experts of these weights (on CPU inputs wanting no gradient): loaded, the weights
    on the CPU with their second dim contiguous (the decoding layouts, `tandem.model.layout`), and the hidden and
    intermediate sizes multiples of `COLUMNS`."""
    return library.loaded() and gate_up.device.type == "cpu" and gate_up.stride(1) == 1 and down.stride(1) == 1 \
        and down.shape[1] % COLUMNS == 0 and down.shape[2] % COLUMNS == 0


def applies(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether the kernel runs these experts on x: it serves them (`serves`), x is on the CPU, and no gradient is
    wanted."""
    return serves(gate_up, down) and x.device.type == "cpu" \
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, gate_up, down)))


def moe_experts(x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum over its experts, as `ExpertBank.forward`: x [T, D], slot_ids [T, K] (local
    slots), weights [T, K], gate_up [P, 2I, D] and down [P, D, I] of x's dtype."""
    return torch.ops.tandem.moe_experts(x, slot_ids, weights, gate_up, down)
