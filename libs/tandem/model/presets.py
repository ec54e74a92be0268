"""Named model shapes for random-weight checkpoints: demos, benchmarks and tests of the serving path."""

from __future__ import annotations

import torch

from tandem.model.config import ModelConfig, RopeConfig
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM, MoE, RMSNorm

PRESETS: dict[str, dict] = {
    # a few million parameters: 4 layers (1 dense), 16 routed experts in 4 groups, 2 MTP modules
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, max_position_embeddings=2048, q_lora_rank=None, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1,
                 moe_intermediate_size=128, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                 routed_scaling_factor=2.5, num_nextn_predict_layers=2),
    # Moonlight-16B-A3B's shape (DeepSeek-V3 architecture)
    "moonlight": dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, num_hidden_layers=27,
                      num_attention_heads=16, max_position_embeddings=8192, q_lora_rank=None, kv_lora_rank=512,
                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                      n_shared_experts=2, moe_intermediate_size=1408, num_experts_per_tok=6, n_group=1, topk_group=1,
                      first_k_dense_replace=1, routed_scaling_factor=2.446, num_nextn_predict_layers=1,
                      rope=RopeConfig(rope_theta=50000.0)),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@torch.no_grad()
def random_model(config: ModelConfig, seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> DeepseekV3ForCausalLM:
    """A model with N(0, std) weights, unit norms and zero correction biases."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekV3ForCausalLM(config)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, MoE):
            module.gate.e_score_correction_bias.zero_()
    for name, p in model.named_parameters():
        if not name.endswith(("norm.weight", "e_score_correction_bias")) and "layernorm" not in name \
                and not name.endswith(("enorm.weight", "hnorm.weight")):
            p.normal_(0.0, std)
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, MoE):
            module.gate.float()
    return model.eval()
