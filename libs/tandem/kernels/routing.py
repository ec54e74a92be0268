"""The CPU kernel of DeepSeekMoE's routing: sigmoid scores, bias-corrected group-limited top-k, gating weights.

As tensor operations (`tandem.moe.routing.route`) a MoE layer's routing is a sigmoid, a top-2 per group, a top-k
of the groups, a mask, a top-k of the experts, a gather and a normalisation: in a compiled decode pass, three
`topk` calls a layer that AOTInductor runs through its fallback to ATen (6 us each on a 2-core EPYC, Zen 4) around
fused kernels of their own, for a few dozen values a token. The kernel (`routing.cpp`) routes each token in one
pass over its logits. It picks the same experts (ties, which `topk` leaves unspecified, go to the lower index)
and lists them best first.

It serves inference on the CPU where the CPU kernels' library is loaded, eager forwards and compiled passes alike
(`applies`); training keeps the tensor operations, whose weights carry gradients.
"""

from __future__ import annotations

import torch

from tandem.kernels import library

library.OPS.define("route(Tensor logits, Tensor bias, int top_k, int n_group, int topk_group, bool norm_topk_prob, "
                   "float routed_scaling_factor) -> (Tensor, Tensor)")


@torch.library.register_fake("tandem::route")
def _(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    return logits.new_empty(logits.shape[0], top_k), logits.new_empty(logits.shape[0], top_k, dtype=torch.int64)


def applies(logits: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether the kernel routes these logits [T, E] with this correction bias [E]: both float32, loaded, on the
    CPU, no gradient wanted."""
    return library.runs_on(logits, bias) and logits.dim() == 2 and logits.dtype == bias.dtype == torch.float32


def route(logits: torch.Tensor, bias: torch.Tensor, *, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """As `tandem.moe.routing.route`: (weights [T, K] float32, expert ids [T, K] int64), each token's experts in
    descending order of their bias-corrected scores."""
    return torch.ops.tandem.route(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)
