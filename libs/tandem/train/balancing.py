"""Auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2).

Each MoE layer's router adds a per-expert bias to the affinities when it picks experts (not when it weights
them). After every optimizer step the bias of an overloaded expert goes down by gamma and that of an
underloaded one up by gamma, so load evens out without a loss term that fights the language-modelling loss.
"""

from __future__ import annotations

import torch

from tandem.model.deepseek_v3 import MoE


def update_correction_bias_(bias: torch.Tensor, load: torch.Tensor, speed: float) -> None:
    """bias [E] += speed * sign(mean load - load [E]), in place."""
    load = load.float()
    bias.add_(speed * torch.sign(load.mean() - load).to(bias.dtype))


def max_violation(load: torch.Tensor) -> float:
    """DeepSeek's MaxVio: (max load - mean load) / mean load; 0 is perfectly balanced."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


class ExpertLoad:
    """Counts the tokens each expert of the given MoE layers receives, through their `route_observer` hooks."""

    def __init__(self, layers: list[MoE]):
        self.layers = layers
        self.counts = [torch.zeros(moe.gate.e_score_correction_bias.shape[0], dtype=torch.int64,
                                   device=moe.gate.e_score_correction_bias.device) for moe in layers]
        self.enabled = True
        for i, moe in enumerate(layers):
            moe.route_observer = self._observer(i)

    def _observer(self, i: int):
        def observe(expert_ids: torch.Tensor) -> None:
            if self.enabled:
                self.counts[i] += torch.bincount(expert_ids.reshape(-1), minlength=self.counts[i].shape[0])
        return observe

    def reset(self) -> None:
        for c in self.counts:
            c.zero_()

    def update_biases(self, speed: float) -> float:
        """Apply the bias update from the counts since the last reset, reset them; returns the mean MaxVio."""
        violations = []
        with torch.no_grad():
            for moe, load in zip(self.layers, self.counts):
                update_correction_bias_(moe.gate.e_score_correction_bias, load, speed)
                violations.append(max_violation(load))
        self.reset()
        return sum(violations) / len(violations) if violations else 0.0

    def detach(self) -> None:
        for moe in self.layers:
            moe.route_observer = None
