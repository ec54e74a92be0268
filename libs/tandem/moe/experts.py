"""Routed-expert FFN execution: a bank of physical experts and the grouped matmuls that run them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import ffn, layer_ops, library
from tandem.kernels.tiles import HoldsTiles
from tandem.model.layout import decode_layout
from tandem.moe.placement import LayerPlacement


class ExpertBank(HoldsTiles):
    """The physical experts one process holds for one MoE layer, stacked: the gate and up projections as one
    [P, 2I, D] (each expert's gate rows, then its up rows, as transformers stacks them) and down [P, D, I]."""

    TILES = ("gate_up_tiles", "down_tiles")  # the weights packed for the CPU kernel (`pack_tiles_`), beside them

    def __init__(self, num_slots: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.gate_up_proj = nn.Parameter(torch.empty(num_slots, 2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_slots, hidden_size, intermediate_size, **kw))

    def pack_tiles_(self) -> bool:
        """Pack the weights for the CPU kernel (`tandem.kernels.ffn`) where it serves them; whether it does."""
        self.gate_up_tiles, self.down_tiles = ffn.pack_experts(self.gate_up_proj, self.down_proj,
                                                               (self.gate_up_tiles, self.down_tiles))
        return self.gate_up_tiles is not None

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "ExpertBank":
        """A bank holding the given stacked weights ({"gate_proj", "up_proj", "down_proj"}), on the CPU in the
        layout decoding reads fastest (see `tandem.model.layout`), packed for the CPU kernel where it is loaded."""
        _, inter, hidden = weights["gate_proj"].shape
        bank = cls(0, hidden, inter)
        stacked = {"gate_up_proj": torch.cat([weights["gate_proj"], weights["up_proj"]], dim=1),
                   "down_proj": weights["down_proj"]}
        for name, w in stacked.items():
            setattr(bank, name, nn.Parameter(decode_layout(name, w) if w.device.type == "cpu" else w,
                                             requires_grad=False))
        bank.pack_tiles_()
        return bank

    @property
    def num_slots(self) -> int:
        return self.gate_up_proj.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.down_proj.shape[2]

    @property
    def gate_proj(self) -> torch.Tensor:
        """[P, I, D], a view."""
        return self.gate_up_proj[:, :self.intermediate_size]

    @property
    def up_proj(self) -> torch.Tensor:
        """[P, I, D], a view."""
        return self.gate_up_proj[:, self.intermediate_size:]

    def forward(self, x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum over each token's experts. x [T, D], slot_ids [T, K] (local slots), weights [T, K].

        The (token, expert) pairs are sorted by slot so that each expert's tokens are one contiguous run; one
        grouped matmul per projection then runs every expert, with no host sync and no per-expert launches,
        where that pays (see `_grouped_mm_pays`). A single token on the CPU skips all of that (`_one_token`).
        Compiled (torch.compile or torch.export), except where grouped matmuls have kernels, `_traceable` runs.
        On the CPU the kernel (`tandem.kernels.ffn`), where it serves the bank, runs instead of all of these.
        """
        # T tokens, K active experts, D hidden, I expert intermediate
        if self.runs_in_kernel and library.runs_on(x, self.gate_up_proj, self.down_proj):
            return ffn.moe_experts(x, slot_ids, weights, self.gate_up_tiles, self.down_tiles)
        if torch.compiler.is_compiling() and not grouped_mm_available(x.device, x.dtype):
            return self._traceable(x, slot_ids, weights)
        if x.shape[0] == 1 and x.device.type == "cpu":
            return self._one_token(x, slot_ids[0], weights[0])
        flat_slots = slot_ids.reshape(-1)
        order = flat_slots.argsort(stable=True)
        token_of_pair = order // slot_ids.shape[1]
        weight_of_pair = weights.reshape(-1)[order]
        h = x.index_select(0, token_of_pair)
        if _grouped_mm_pays(h, self.num_slots):
            # counted by scatter_add_, not bincount, which syncs with the host on CUDA to size its output: a
            # CUDA graph could not capture it
            counts = torch.zeros(self.num_slots, dtype=torch.int64, device=x.device)
            ends = counts.scatter_add_(0, flat_slots, torch.ones_like(flat_slots)).cumsum(0).to(torch.int32)
            h = _swiglu(F.grouped_mm(h, self.gate_up_proj.mT, offs=ends), weight_of_pair)
            h = F.grouped_mm(h, self.down_proj.mT, offs=ends)
        else:
            h = self._per_expert(h, flat_slots[order], weight_of_pair)
        return torch.zeros_like(x).index_add_(0, token_of_pair, h)

    def _one_token(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token (a CPU decode step of one sequence): its experts one after another, with no sorting or
        gathering; the same sums in the same order as the other paths. About a third fewer ops."""
        out = torch.zeros_like(x)
        slots = slots.tolist()
        for k in sorted(range(len(slots)), key=slots.__getitem__):
            h = _swiglu(F.linear(x, self.gate_up_proj[slots[k]]), weights[k:k + 1])
            out.add_(F.linear(h, self.down_proj[slots[k]]))
        return out

    def _traceable(self, x: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """What the compilers trace where the eager paths cannot go: `_one_token` and `_per_expert` read slots
        on the host, and `F.grouped_mm` has no float32 kernel for the compiler outside CUDA bfloat16.

        While the (token, expert) pairs are no more than the slots, each pair reads its expert's weights:
        products written as gather-multiply-sum, which the compiler fuses into one pass over those weights, so a
        decode step of one token reads just its K experts. Past that, every expert runs on every token, each
        intermediate weighed by the token's gate weight (zero for experts it did not choose): each weight is read
        once, for up to P/K times the multiplies. On a 2-core Xeon either made a compiled forward of the bundled
        model (16 experts, 4 active) 1.7-3x faster than eager."""
        if x.shape[0] <= self._most_gathered_tokens(slot_ids.shape[1]):
            h = _swiglu((x[:, None, None, :] * self.gate_up_proj[slot_ids]).sum(-1), weights)  # [T, K, I]
            return (h[..., None, :] * self.down_proj[slot_ids]).sum(-1).sum(1)  # [T, K, D] summed over K
        combine = torch.zeros(x.shape[0], self.num_slots, dtype=x.dtype, device=x.device)
        combine.scatter_(1, slot_ids, weights.to(x.dtype))  # [T, P]
        if self._side_by_side:
            return self._every_expert_as_one_matmul(x, combine)
        h = _swiglu(torch.matmul(x, self.gate_up_proj.mT), combine.t())  # [P, T, I]
        return torch.matmul(h, self.down_proj.mT).sum(0)  # [P, T, D] summed over the experts

    @property
    def _side_by_side(self) -> bool:
        """Whether the gate and up projections lie in memory as one [D, P*2I] matrix and the down projections as
        one [P*I, D] (`tandem.model.layout.experts_side_by_side`, `column_major`)."""
        return self.gate_up_proj.permute(2, 0, 1).is_contiguous() and self.down_proj.mT.is_contiguous()

    def _every_expert_as_one_matmul(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, as two matmuls over all the experts' weights side by side: the tokens by
        every gate and up column, then the gate-weighed intermediates of every expert by the down rows, whose sum
        over the experts is the matmul's own."""
        T, (P, I, D) = x.shape[0], (self.num_slots, self.intermediate_size, x.shape[1])
        gate_up = x @ self.gate_up_proj.permute(2, 0, 1).reshape(D, P * 2 * I)  # views, no copy
        h = _swiglu(gate_up.view(T, P, 2 * I), combine)  # [T, P, I]
        return h.reshape(T, P * I) @ self.down_proj.mT.reshape(P * I, D)

    def max_gathered_tokens(self, top_k: int) -> int | None:
        """The most tokens of `top_k` experts each that `_traceable` runs by gathering their experts' weights
        (no more (token, expert) pairs than slots); more run densely. A compiled graph serves one side of this.
        None where the CPU kernel runs the bank (`runs_in_kernel`), whatever the tokens."""
        return None if self.runs_in_kernel else self._most_gathered_tokens(top_k)

    def _most_gathered_tokens(self, top_k: int) -> int:
        return self.num_slots // top_k

    @property
    def runs_in_kernel(self) -> bool:
        """Whether the CPU kernel (`tandem.kernels.ffn`) runs this bank's experts, on inputs wanting no gradient: it
        is loaded and they are packed for it (`pack_tiles_`)."""
        return self.gate_up_tiles is not None and library.loaded()

    def _per_expert(self, h: torch.Tensor, sorted_slots: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The experts one at a time, each over its run of `h` (its rows' intermediates times `scale`, their gate
        weights); one host sync for the run lengths."""
        out = torch.empty(h.shape[0], self.down_proj.shape[1], dtype=h.dtype, device=h.device)
        start = 0
        for slot, count in enumerate(torch.bincount(sorted_slots, minlength=self.num_slots).tolist()):
            if count:
                rows = _swiglu(F.linear(h[start:start + count], self.gate_up_proj[slot]), scale[start:start + count])
                out[start:start + count] = F.linear(rows, self.down_proj[slot])
                start += count
        return out


def _swiglu(gate_up: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up times each token's gate weight for the expert (`scale`, gate_up's shape but its last dim),
    from gate and up projections side by side in the last dim ([..., 2I] -> [..., I]). The weight scales the
    intermediate, not the output: the down projection is linear, and the intermediate is the narrower."""
    return layer_ops.swiglu(*gate_up.chunk(2, dim=-1), scale)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `F.grouped_mm` has CUDA kernels here: bfloat16, compute capability 8.0 (Ampere) on, and a torch
    that has it (a GPU image's may be older than the pinned one)."""
    return device.type == "cuda" and dtype == torch.bfloat16 and hasattr(F, "grouped_mm") \
        and torch.cuda.get_device_capability(device)[0] >= 8


def _grouped_mm_pays(pairs: torch.Tensor, num_slots: int) -> bool:
    """On CUDA where `F.grouped_mm` has kernels (`grouped_mm_available`). Its CPU version, for every float dtype,
    runs one matmul per group, empty ones included: on CPU it beats one matmul per used expert only when at least
    about half the slots have tokens. An empty batch goes the per-expert way, which does nothing."""
    if pairs.shape[0] == 0:
        return False
    if pairs.device.type == "cpu":
        return 2 * pairs.shape[0] >= num_slots
    return grouped_mm_available(pairs.device, pairs.dtype)


class LocalExperts(nn.Module):
    """Colocated execution: every physical expert of the layer lives in this process.

    The same call signature is what a remote dispatcher implements, so the model does not know where its
    experts run.
    """

    def __init__(self, bank: ExpertBank, placement: LayerPlacement):
        super().__init__()
        self.bank = bank
        # buffers, so that the table follows the bank to its device
        self.register_buffer("log2phy", placement.log2phy, persistent=False)
        self.register_buffer("logcnt", placement.logcnt, persistent=False)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        slots = LayerPlacement(self.log2phy, self.logcnt).to_physical(expert_ids)
        return self.bank(x, slots, weights)
