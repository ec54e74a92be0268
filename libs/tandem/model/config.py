"""The model's settings, read from a Hugging Face `config.json` of the DeepSeek-V3 architecture.

Both forms of the RoPE settings are accepted: the older one that DeepSeek's own checkpoints use
(`rope_theta` + `rope_scaling = {"type": "yarn", ...}`) and the newer `rope_parameters` form that
transformers 5 writes. Everything is validated once here, so the model code can trust its config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class ConfigError(ValueError):
    """A `config.json` that Tandem cannot serve; the message names the file and the field."""


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """Rotary embedding settings; `rope_type` is "default" or "yarn"."""

    rope_theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def is_yarn(self) -> bool:
        return self.rope_type == "yarn"

    @property
    def cos_sin_scale(self) -> float:
        """YaRN scales cos/sin by this factor (1.0 for DeepSeek-V3, whose mscale equals mscale_all_dim)."""
        if not self.is_yarn:
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


@dataclass(slots=True, frozen=True)
class ModelConfig:
    """One DeepSeek-V3-architecture model, as its `config.json` describes it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    # mla
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_interleave: bool = True
    # moe
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # mtp
    num_nextn_predict_layers: int = 0
    # "deepseek": module k reads module k-1's output (the causal chain); "meta": every module reads the main
    # model's hidden state (independent parallel heads, Gloeckle et al. 2024). Not a DeepSeek config key.
    mtp_head_type: str = "deepseek"
    # fp8 block quantisation of the stored weights, e.g. (128, 128); None when weights are not quantised
    weight_block_size: tuple[int, int] | None = None
    model_type: str = "deepseek_v3"

    def __post_init__(self) -> None:
        self.validate()

    # derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per token per layer the KV cache stores the latent and the decoupled rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.is_yarn and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers from `first_k_dense_replace` on are MoE, the MTP layers (idx >= num_hidden_layers) included."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def num_kv_layers(self) -> int:
        """Main layers plus one attention layer per MTP module: all of them keep a KV cache."""
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts="
                                  f"{self.n_routed_experts}]")
            if self.n_routed_experts % self.n_group:
                raise ConfigError(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                raise ConfigError("group-limited routing scores a group by its top-2 experts: "
                                  f"each of the n_group={self.n_group} groups needs at least 2 experts")
            if self.topk_group * per_group < self.num_experts_per_tok:
                raise ConfigError(f"topk_group={self.topk_group} groups of {per_group} experts cannot supply "
                                  f"num_experts_per_tok={self.num_experts_per_tok} experts")
            if self.moe_intermediate_size <= 0:
                raise ConfigError("moe_intermediate_size must be positive when n_routed_experts > 0")
        if self.rope.rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope type {self.rope.rope_type!r} is not supported (use 'default' or 'yarn')")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("num_nextn_predict_layers must be >= 0")
        if self.mtp_head_type not in ("deepseek", "meta"):
            raise ConfigError(f"mtp_head_type must be 'deepseek' or 'meta', got {self.mtp_head_type!r}")

    # (de)serialisation ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported; Tandem serves the "
                              f"DeepSeek-V3 architecture ({', '.join(SUPPORTED_MODEL_TYPES)})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        if raw.get("scoring_func", "sigmoid") != "sigmoid":
            raise ConfigError(f"{source}: scoring_func {raw['scoring_func']!r} is not supported (only 'sigmoid')")
        if raw.get("moe_layer_freq", 1) != 1:
            raise ConfigError(f"{source}: moe_layer_freq {raw['moe_layer_freq']} is not supported (only 1)")
        known = {f.name for f in fields(cls)} - {"rope", "eos_token_id", "weight_block_size"}
        kwargs: dict[str, Any] = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        kwargs["q_lora_rank"] = raw.get("q_lora_rank")
        eos = raw.get("eos_token_id")
        kwargs["eos_token_id"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        kwargs["rope"] = _parse_rope(raw, source)
        quant = raw.get("quantization_config")
        if quant:
            if quant.get("quant_method") != "fp8":
                raise ConfigError(f"{source}: quantization {quant.get('quant_method')!r} is not supported (only fp8)")
            kwargs["weight_block_size"] = tuple(quant.get("weight_block_size", (128, 128)))
        try:
            return cls(**kwargs)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` form (newer `rope_parameters` layout)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("rope", "weight_block_size", "eos_token_id")}
        rope = asdict(self.rope)
        if not self.rope.is_yarn:
            rope = {"rope_type": "default", "rope_theta": self.rope.rope_theta}
        out["rope_parameters"] = rope
        out["eos_token_id"] = list(self.eos_token_id)
        out["architectures"] = ["DeepseekV3ForCausalLM"]
        out["hidden_act"] = "silu"
        out["num_key_value_heads"] = self.num_attention_heads
        out["scoring_func"] = "sigmoid"
        out["topk_method"] = "noaux_tc"
        if self.weight_block_size:
            out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(self.weight_block_size)}
        return out


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope settings must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if rope_type != "yarn":
        return RopeConfig(rope_theta=float(theta), rope_type=rope_type)
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConfigError(f"{source}: yarn rope needs original_max_position_embeddings")
    factor = params.get("factor") or raw["max_position_embeddings"] / original
    return RopeConfig(
        rope_theta=float(theta), rope_type="yarn", factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction (DeepSeek's `yarn_get_mscale`)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
