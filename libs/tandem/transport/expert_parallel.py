"""Expert parallelism as a transform: the same model, its routed experts moved to expert servers.

An attention worker loads the model without its routed experts and swaps each MoE layer's `experts` for a
`RemoteExperts`; an expert server loads only the physical experts in its slots. The placement's rows are the
model's MoE layers in order (main layers, then MTP layers); `moe_layer_ids` names them.
"""

from __future__ import annotations

import torch

from tandem.model.checkpoint import Checkpoint
from tandem.model.config import ModelConfig
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM
from tandem.model.loading import load_experts
from tandem.moe.experts import ExpertBank
from tandem.moe.placement import Placement
from tandem.transport.expert_dispatch import RemoteExperts
from tandem.transport.group import DataPlane


def moe_layer_ids(config: ModelConfig, num_mtp_layers: int | None = None) -> list[int]:
    """Model layer index of each MoE layer, in placement-row order."""
    mtp = config.num_nextn_predict_layers if num_mtp_layers is None else num_mtp_layers
    return [i for i in range(config.num_hidden_layers + mtp) if config.is_moe_layer(i)]


def use_remote_experts(model: DeepseekV3ForCausalLM, plane: DataPlane, placement: Placement,
                       slots_per_server: int, timeout_s: float) -> None:
    """Route every MoE layer's tokens to the expert servers that `placement` names (in place)."""
    layer_ids = moe_layer_ids(model.config)
    if placement.num_layers != len(layer_ids):
        raise ValueError(f"placement has {placement.num_layers} MoE layers, the model {len(layer_ids)}")
    for row, layer_idx in enumerate(layer_ids):
        model.model.layers[layer_idx].mlp.experts = RemoteExperts(plane, layer_idx, placement.layer_table(row),
                                                                  slots_per_server, timeout_s, placement.version)


def switch_placement(model: DeepseekV3ForCausalLM, placement: Placement) -> None:
    """Route every MoE layer with `placement` (a newer version) from the next call on; between engine steps."""
    layer_ids = moe_layer_ids(model.config)
    if placement.num_layers != len(layer_ids):
        raise ValueError(f"placement has {placement.num_layers} MoE layers, the model {len(layer_ids)}")
    for row, layer_idx in enumerate(layer_ids):
        experts = model.model.layers[layer_idx].mlp.experts
        if not isinstance(experts, RemoteExperts):
            raise TypeError(f"layer {layer_idx} does not route to expert servers (use_remote_experts first)")
        experts.set_placement(placement.layer_table(row), placement.version)


def load_server_experts(ckpt: Checkpoint, placement: Placement, server_idx: int, slots_per_server: int,
                        num_mtp_layers: int, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> tuple[dict[int, ExpertBank], dict[int, torch.Tensor]]:
    """The banks of expert server `server_idx` (model layer -> ExpertBank of its slots) and the logical expert
    of each local slot; only those experts' tensors are read."""
    banks, phy2log = {}, {}
    first = server_idx * slots_per_server
    for row, layer_idx in enumerate(moe_layer_ids(ckpt.config, num_mtp_layers)):
        mine = placement.phy2log[row, first:first + slots_per_server]
        weights = load_experts(ckpt, layer_idx, mine.tolist(), dtype=dtype, device=device)
        banks[layer_idx] = ExpertBank.from_weights(weights)
        phy2log[layer_idx] = mine.clone()
    return banks, phy2log


def restage_server_experts(ckpt: Checkpoint, placement: Placement, server_idx: int, slots_per_server: int,
                           held_banks: dict[int, ExpertBank], held_phy2log: dict[int, torch.Tensor],
                           dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           ) -> tuple[dict[int, ExpertBank], dict[int, torch.Tensor], int]:
    """Server `server_idx`'s banks for a new `placement`, next to the ones it holds: an expert it already holds
    (in any slot) is copied from memory, only the others are read from the checkpoint. Returns (banks,
    phy2log, experts read). Layers the server holds no bank for (rows of MTP layers a checkpoint lacks) stay
    out, as in `load_server_experts`."""
    banks, phy2log, num_read = {}, {}, 0
    first = server_idx * slots_per_server
    for row, layer_idx in enumerate(moe_layer_ids(ckpt.config)):
        if layer_idx not in held_banks:
            continue
        mine = placement.phy2log[row, first:first + slots_per_server].tolist()
        held_slot = {expert: slot for slot, expert in enumerate(held_phy2log[layer_idx].tolist())}
        missing = sorted({e for e in mine if e not in held_slot})
        read = load_experts(ckpt, layer_idx, missing, dtype=dtype, device=device) if missing else {}
        held = held_banks[layer_idx]
        weights = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            stacked = getattr(held, proj).detach()
            weights[proj] = torch.stack([stacked[held_slot[e]] if e in held_slot else read[proj][missing.index(e)]
                                         for e in mine]).to(dtype=dtype, device=device)
        banks[layer_idx] = ExpertBank.from_weights(weights)
        phy2log[layer_idx] = torch.tensor(mine, dtype=torch.int64)
        num_read += len(missing)
    return banks, phy2log, num_read

