"""Weight memory layout for decoding on CPUs.

A linear layer's weight is [out, in], stored row-major. Stored column-major instead (the memory of its transpose
[in, out] contiguous; same shape, same values), a matmul of a few rows streams it once, where row-major makes CPU
BLAS run `out` strided dot products. On a 2-core AMD EPYC (Zen 4) with PyTorch 2.13, one-row products of this
model's matrices (80 to 4096 rows of 128 to 768) ran 1.3-1.9x faster column-major with the weights out of cache,
1.1-1.2x at 4 rows, and equally fast from 32 rows on: decoding reads every weight for a handful of rows per step.
GPUs are left as they are.

An expert bank's gate and up projections in bfloat16 (any dtype but float32) are stored with every expert's columns
side by side instead (`experts_side_by_side`): one [in, experts * out] matrix, so that a step running every expert
on every token (`ExpertBank._traceable`) makes one matmul of it, which a compiled step runs in Inductor's own GEMM
kernel, where the batched matmuls went to oneDNN. In float32 the batched matmuls over column-major experts were
the faster (on a 2-core Xeon, Sapphire Rapids, at the bundled model's batch-32 step: per MoE layer, compiled ahead
of time, 174 against 356 us in bfloat16; 665 against 542 us in float32).
"""

from __future__ import annotations

import torch
from torch import nn


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same matrix (or stack of matrices, [..., out, in]) stored column-major."""
    return weight.mT.contiguous().mT


def experts_side_by_side(weights: torch.Tensor) -> torch.Tensor:
    """The same stack of expert matrices [experts, out, in], stored as one [in, experts * out] matrix: each
    expert's matrix column-major, the experts' columns side by side."""
    return weights.permute(2, 0, 1).contiguous().permute(1, 2, 0)


def decode_layout(name: str, weight: torch.Tensor) -> torch.Tensor:
    """A CPU matrix named `name` in the layout decoding reads fastest: an expert bank's gate and up projections
    side by side unless in float32, every other matrix column-major."""
    if name.endswith("gate_up_proj") and weight.dtype != torch.float32:
        return experts_side_by_side(weight)
    return column_major(weight)


def use_decode_layout_(model: nn.Module) -> None:
    """In place: every matrix of `model` on the CPU in its decoding layout (`decode_layout`), except the
    embedding (looked up by row, and the output head with it when tied) and the MLA up-projection `kv_b_proj`,
    which attention reshapes per head."""
    embedding = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, param in model.named_parameters():
        if param.device.type != "cpu" or param.dim() < 2 or id(param) in embedding or "kv_b_proj" in name:
            continue
        param.data = decode_layout(name, param.data)
