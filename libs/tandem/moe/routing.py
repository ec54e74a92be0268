"""DeepSeekMoE routing: sigmoid affinities, bias-corrected group-limited top-k selection.

Pure tensor math so that attention workers (which route) and tests can call it without the model; on the CPU, for
inference, one kernel (`tandem.kernels.routing`) where it applies.
"""

from __future__ import annotations

import torch

from tandem.kernels import routing as routing_kernel


def route(
    logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose `top_k` experts per token and their gating weights.

    logits: [T, E] router logits (float32). Returns (weights [T, K] float32, expert_ids [T, K] int64).
    The correction bias steers *which* experts are chosen (auxiliary-loss-free load balancing) but the
    weights come from the uncorrected sigmoid scores, as in DeepSeek-V3.
    """
    if routing_kernel.applies(logits, e_score_correction_bias):
        return routing_kernel.route(logits, e_score_correction_bias, top_k=top_k, n_group=n_group,
                                    topk_group=topk_group, norm_topk_prob=norm_topk_prob,
                                    routed_scaling_factor=routed_scaling_factor)
    # T tokens, E experts, G groups, K active experts
    scores = logits.sigmoid()
    choice = scores + e_score_correction_bias
    if n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]: a group is as good as its best two
        top_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        choice = choice.masked_fill(~group_mask[:, :, None].expand_as(grouped).reshape(T, E), float("-inf"))
    expert_ids = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, expert_ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, expert_ids
