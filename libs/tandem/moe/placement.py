"""Placement: which physical expert slot serves each logical expert, per MoE layer.

A logical expert is expert j of the checkpoint; a physical expert is one loaded copy of it. Hot experts may
have several copies (redundant experts); tokens routed to a replicated expert are spread evenly over its
copies. Slot p lives on expert server p // slots_per_server.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class Placement:
    """phy2log: [L, P] logical expert held by each physical slot, for each of L MoE layers."""

    phy2log: torch.Tensor
    num_logical: int
    version: int = 0

    def __post_init__(self) -> None:
        counts = self.logcnt
        if (counts == 0).any():
            layer, expert = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"placement version {self.version}: logical expert {expert} of MoE layer {layer} "
                             "has no physical slot")

    @classmethod
    def identity(cls, num_layers: int, num_experts: int) -> "Placement":
        """Each logical expert once, in slot order (the colocated engine and a static cluster)."""
        return cls(torch.arange(num_experts, device="cpu").repeat(num_layers, 1), num_experts)

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def logcnt(self) -> torch.Tensor:
        """[L, E] number of copies of each logical expert."""
        counts = torch.zeros(self.num_layers, self.num_logical, dtype=torch.int64, device=self.phy2log.device)
        return counts.scatter_add_(1, self.phy2log, torch.ones_like(self.phy2log))

    @property
    def log2phy(self) -> torch.Tensor:
        """[L, E, R] physical slots of each logical expert, padded with -1 (R = most copies of any expert)."""
        counts = self.logcnt
        out = torch.full((self.num_layers, self.num_logical, int(counts.max())), -1, dtype=torch.int64,
                         device=self.phy2log.device)
        for layer in range(self.num_layers):
            seen = [0] * self.num_logical
            for slot, expert in enumerate(self.phy2log[layer].tolist()):
                out[layer, expert, seen[expert]] = slot
                seen[expert] += 1
        return out

    def layer_table(self, layer: int) -> "LayerPlacement":
        return LayerPlacement(self.log2phy[layer], self.logcnt[layer])


@dataclass(slots=True)
class LayerPlacement:
    """One MoE layer's logical -> physical table, in the form the dispatch hot path wants."""

    log2phy: torch.Tensor  # [E, R]
    logcnt: torch.Tensor  # [E]

    def to_physical(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """Map routed logical ids [T, K] to physical slots, spreading each expert's tokens over its copies."""
        # T tokens, K active experts; token t goes to copy (t mod copies) of its expert
        if self.log2phy.shape[1] == 1:  # one copy of every expert
            return self.log2phy[expert_ids, 0]
        counts = self.logcnt[expert_ids]
        token = torch.arange(expert_ids.shape[0], device=expert_ids.device)[:, None]
        return self.log2phy[expert_ids, token % counts]
