"""Between checkpoint tensors and model parameters.

A parameter's name is its checkpoint name, with two exceptions: the routed experts of a layer are stacked
into one `ExpertBank` (`...mlp.experts.bank.down_proj` [E, D, I] holds `...mlp.experts.{e}.down_proj.weight`
for every e, and `...bank.gate_up_proj` [E, 2I, D] each expert's gate_proj above its up_proj), and MTP layers
use the main model's embedding and output head (DeepSeek's checkpoints store copies of both in every MTP layer;
we write them on export so vLLM and SGLang can read our checkpoints).
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
from tqdm import tqdm

from tandem.model.checkpoint import Checkpoint, CheckpointError
from tandem.model.config import ModelConfig
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM
from tandem.model.layout import use_decode_layout_

log = logging.getLogger(__name__)

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_BANK = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.bank\.(gate_up_proj|down_proj)$")
# a bank parameter's checkpoint tensors per expert, stacked along dim 1
_BANK_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def load_experts(ckpt: Checkpoint, layer: int, experts: Iterable[int], *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Stacked weights of some logical experts of one layer: {proj: [len(experts), ...]}. Reads only those."""
    c = ckpt.config
    shapes = {"gate_proj": (c.moe_intermediate_size, c.hidden_size), "up_proj": (c.moe_intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.moe_intermediate_size)}
    experts = list(experts)
    return {proj: torch.stack([ckpt.load(expert_key(layer, e, proj), shape=shapes[proj], dtype=dtype, device=device)
                               for e in experts]) for proj in EXPERT_PROJS}


def _mtp_layers_present(ckpt: Checkpoint) -> int:
    """How many of the config's MTP layers the checkpoint really has (transformers saves none)."""
    c = ckpt.config
    present = 0
    for k in range(c.num_nextn_predict_layers):
        if not ckpt.has(f"model.layers.{c.num_hidden_layers + k}.eh_proj.weight"):
            break
        present += 1
    return present


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               mtp_input: str = "post_norm", load_routed_experts: bool = True,
               show_progress: bool = False, column_major: bool = True) -> DeepseekV3ForCausalLM:
    """Build the model of a checkpoint directory and fill it.

    With `load_routed_experts=False` the expert banks stay empty (an attention worker whose experts live on
    expert servers). Router weights and correction biases stay float32 whatever `dtype` is. `column_major`:
    CPU weights in the layout decoding reads fastest (`tandem.model.layout`); training turns it off, since a
    resumed run must repeat an uninterrupted one bit for bit and matmuls round differently per layout.
    """
    ckpt = Checkpoint(path)
    config = ckpt.config
    mtp_present = _mtp_layers_present(ckpt)
    if mtp_present < config.num_nextn_predict_layers:
        log.warning("%s: config.json declares %d MTP layer(s) but the checkpoint holds %d; speculative decoding "
                    "uses only those", ckpt.path, config.num_nextn_predict_layers, mtp_present)
        config = replace(config, num_nextn_predict_layers=mtp_present)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, mtp_input=mtp_input)
    model.to_empty(device=device)
    model.init_buffers()
    params = dict(model.named_parameters())
    if config.tie_word_embeddings:
        params.pop("lm_head.weight")
    for name, param in tqdm(params.items(), desc="loading weights", disable=not show_progress, unit="tensor"):
        is_router = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        target_dtype = torch.float32 if is_router else dtype
        bank = _BANK.match(name)
        if bank:
            layer, parts = int(bank.group(1)), _BANK_PARTS[bank.group(2)]
            experts = range(param.shape[0]) if load_routed_experts else []
            shape = (param.shape[1] // len(parts), param.shape[2])
            value = torch.stack([torch.cat([ckpt.load(expert_key(layer, e, part), shape=shape, dtype=target_dtype,
                                                      device=device) for part in parts])
                                 for e in experts]) \
                if experts else torch.empty(0, *param.shape[1:], dtype=target_dtype, device=device)
        else:
            value = ckpt.load(name, shape=tuple(param.shape), dtype=target_dtype, device=device)
        _set_param(model, name, value)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if column_major:
        use_decode_layout_(model)
    model.eval()
    return model


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = getattr(owner, attr)
    setattr(owner, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))


def export_state_dict(model: DeepseekV3ForCausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face checkpoint names (experts unstacked, MTP shared copies added)."""
    c = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        bank = _BANK.match(name)
        if bank:
            layer, parts = int(bank.group(1)), _BANK_PARTS[bank.group(2)]
            for e in range(tensor.shape[0]):
                for part, value in zip(parts, tensor[e].chunk(len(parts))):
                    out[expert_key(layer, e, part)] = value.detach().clone()
        elif not (c.tie_word_embeddings and name == "lm_head.weight"):
            out[name] = tensor.detach().clone()
    for k in range(c.num_nextn_predict_layers):
        prefix = f"model.layers.{c.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[prefix + "shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    return out


__all__ = ["CheckpointError", "ModelConfig", "expert_key", "export_state_dict", "load_experts", "load_model"]
