"""The CPU kernels of an eager forward's elementwise layer operations: RMSNorm, the rotary embedding, and SwiGLU's
silu(gate) * up (times each routed expert's gate weight).

Written as tensor operations, each of them is several passes over its rows, each pass a kernel of its own that
reads and writes memory: a bfloat16 RMSNorm converts to float32, squares, averages, scales, converts back and
multiplies by the weight. At a 4096-token prefill of the bundled model (batch 32 x 128) on a 2-core Xeon those
passes took about half of the forward, more than its matmuls; memory bandwidth, not arithmetic, bounds them. Each
kernel here (`layer_ops.cpp`) is one pass, computing in float32 and rounding to the model's dtype once, as
vLLM's and SGLang's fused kernels of the same operations do.

They serve eager forwards (prompt chunks, and steps that have no compiled graph) of inference on the CPU;
compiled passes keep the tensor operations, which Inductor fuses itself, and so does training, which needs their
gradients (`applies`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.kernels import library

library.OPS.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
library.OPS.define("rope(Tensor x, Tensor cos, Tensor sin, bool interleave) -> Tensor")
library.OPS.define("silu_mul(Tensor gate, Tensor up, Tensor? scale) -> Tensor")


def applies(x: torch.Tensor, *more: torch.Tensor) -> bool:
    """Whether the kernels serve an operation on x (and tensors `more`, its weights say): loaded, on the CPU, not
    being traced by a compiler, and no gradient wanted of any."""
    return library.runs_on(x, *more) and not torch.compiler.is_compiling()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x normalised in float32, rounded to x's dtype), over x's last dim; weight of x's dtype."""
    rows = x if x.dim() == 2 and x.stride(-1) == 1 else x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.tandem.rms_norm(rows, weight, eps).view(x.shape)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, heads, R] rotated by cos and sin (T x R/2 values of x's dtype), laid out as `RopeTables.rotate`
    lays it out."""
    return torch.ops.tandem.rope(x, cos, sin, interleave)


def silu_mul(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for [N, I] gate and up, each row times scale [N] where given."""
    return torch.ops.tandem.silu_mul(gate, up, scale)


def swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up, times scale (gate's shape but its last dim: a routed expert's gate weight per token) where
    given: in the kernel (`silu_mul`) for rows [N, I] where it applies, else as tensor operations."""
    if gate.dim() == 2 and applies(gate, up, *([] if scale is None else [scale])):
        return silu_mul(gate, up, scale)
    out = F.silu(gate) * up
    return out if scale is None else out * scale.to(gate.dtype)[..., None]
