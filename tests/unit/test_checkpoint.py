"""Checkpoint reading and writing on real files: round trips, selective loading, FP8, and error messages."""

import json

import pytest
import torch

from tandem.model.checkpoint import (Checkpoint, CheckpointError, quantize_checkpoint_fp8, quantize_fp8_blockwise,
                                     save_checkpoint)
from tandem.model.config import ConfigError, ModelConfig

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
LINEARS = ("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tiny_weights(cfg: ModelConfig = CONFIG) -> dict[str, torch.Tensor]:
    """A DeepSeek-V3-shaped state dict in bf16, plus a router and its bias to prove they stay unquantised."""
    g = torch.Generator().manual_seed(0)
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    shapes = {
        "self_attn.q_proj": (heads * cfg.qk_head_dim, h),
        "self_attn.kv_a_proj_with_mqa": (cfg.kv_cache_dim, h),
        "self_attn.kv_b_proj": (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "self_attn.o_proj": (h, heads * cfg.v_head_dim),
        "mlp.gate_proj": (cfg.intermediate_size, h),
        "mlp.up_proj": (cfg.intermediate_size, h),
        "mlp.down_proj": (h, cfg.intermediate_size),
        "mlp.gate": (4, h),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "self_attn.kv_a_layernorm": (cfg.kv_lora_rank,),
    }
    out = {"model.embed_tokens.weight": torch.randn(cfg.vocab_size, h, generator=g),
           "model.norm.weight": torch.ones(h), "lm_head.weight": torch.randn(cfg.vocab_size, h, generator=g),
           "model.layers.1.mlp.gate.e_score_correction_bias": torch.zeros(4)}
    for i in range(cfg.num_hidden_layers):
        for module, shape in shapes.items():
            out[f"model.layers.{i}.{module}.weight"] = torch.randn(shape, generator=g)
    return {name: t.to(torch.bfloat16) for name, t in out.items()}


def assert_names(error: pytest.ExceptionInfo, *parts: object) -> None:
    for part in parts:
        assert str(part) in str(error.value), f"{part!r} not in {error.value!r}"


def test_single_file_round_trip(tmp_path):
    weights = tiny_weights()
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"model": {}}')
    save_checkpoint(tmp_path / "ckpt", CONFIG, weights, tokenizer_json=tokenizer)
    ckpt = Checkpoint(tmp_path / "ckpt")
    assert ckpt.config == CONFIG
    assert ckpt.names() == sorted(weights)
    assert (ckpt.path / "tokenizer.json").read_text() == tokenizer.read_text()
    assert not (ckpt.path / "model.safetensors.index.json").exists()
    loaded = ckpt.load_many(weights, dtype=torch.bfloat16)
    for name, tensor in weights.items():
        assert loaded[name].dtype == torch.bfloat16
        assert torch.equal(loaded[name], tensor), name
    assert ckpt.load("lm_head.weight").dtype == torch.float32


def test_sharded_round_trip_and_selective_loading(tmp_path):
    weights = tiny_weights()
    save_checkpoint(tmp_path, CONFIG, weights, max_shard_bytes=8 * 1024)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in weights.values())
    assert not (tmp_path / "model.safetensors").exists()

    ckpt = Checkpoint(tmp_path)
    assert ckpt.shards_opened == set()
    name = "model.layers.1.mlp.down_proj.weight"
    assert ckpt.has(name) and not ckpt.has("model.layers.9.mlp.down_proj.weight")
    assert torch.equal(ckpt.load(name, shape=weights[name].shape, dtype=torch.bfloat16), weights[name])
    assert ckpt.shards_opened == {index["weight_map"][name]}

    for name, tensor in weights.items():
        assert ckpt.tensor_shape(name) == tuple(tensor.shape)
        assert torch.equal(ckpt.load(name, dtype=torch.bfloat16), tensor), name
    assert ckpt.shards_opened == set(shards)


def test_quantize_fp8_blockwise_partial_blocks():
    weight = (torch.randn(200, 300) * torch.linspace(0.01, 10, 300)).to(torch.bfloat16)
    fp8, scale_inv = quantize_fp8_blockwise(weight)
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == (200, 300)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 3)
    restored = fp8.float() * scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    for r in range(0, 200, 128):
        for c in range(0, 300, 128):
            block = weight.float()[r:r + 128, c:c + 128]
            err = (restored[r:r + 128, c:c + 128] - block).abs().max()
            assert err <= 0.07 * block.abs().max(), (r, c, err)

    zeros, zero_scale = quantize_fp8_blockwise(torch.zeros(3, 5))
    assert torch.equal(zeros.float(), torch.zeros(3, 5)) and torch.isfinite(zero_scale).all()


def test_quantize_checkpoint_fp8(tmp_path):
    weights = tiny_weights()
    save_checkpoint(tmp_path / "bf16", CONFIG, weights, max_shard_bytes=16 * 1024)
    quantize_checkpoint_fp8(tmp_path / "bf16", tmp_path / "fp8", block=(16, 16))
    fp8 = Checkpoint(tmp_path / "fp8")
    assert fp8.config.weight_block_size == (16, 16)
    assert fp8.names() == sorted(weights)  # scale companions are not listed
    for name, tensor in weights.items():
        quantised = any(f".{module}.weight" in name for module in LINEARS)
        assert fp8.tensor_dtype(name) == (torch.float8_e4m3fn if quantised else torch.bfloat16), name
        assert fp8.has(name + "_scale_inv") == quantised, name
        loaded = fp8.load(name, shape=tensor.shape)
        assert loaded.dtype == torch.float32
        if quantised:
            assert (loaded - tensor.float()).abs().max() <= 0.07 * tensor.float().abs().max(), name
        else:
            assert torch.equal(loaded, tensor.float()), name
    scale = fp8.load("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
    assert scale.shape == (2, 2)  # 24 x 32 in blocks of 16: the row blocks end in a partial one


def test_quantize_casts_the_unquantised_matrices_and_keeps_vectors(tmp_path):
    weights = {name: t.float() for name, t in tiny_weights().items()}
    save_checkpoint(tmp_path / "fp32", CONFIG, weights)
    quantize_checkpoint_fp8(tmp_path / "fp32", tmp_path / "fp8", block=(16, 16), matrix_dtype=torch.bfloat16)
    fp8 = Checkpoint(tmp_path / "fp8")
    for name, tensor in weights.items():
        if any(f".{module}.weight" in name for module in LINEARS):
            assert fp8.tensor_dtype(name) == torch.float8_e4m3fn, name
        elif tensor.dim() >= 2:
            assert fp8.tensor_dtype(name) == torch.bfloat16, name  # embeddings, heads, router
        else:
            assert fp8.tensor_dtype(name) == torch.float32, name  # norms, correction biases
            assert torch.equal(fp8.load(name), tensor), name
    assert fp8.tensor_dtype("model.embed_tokens.weight") == torch.bfloat16


def test_missing_tensor(tmp_path):
    save_checkpoint(tmp_path, CONFIG, tiny_weights())
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path).load("model.layers.7.mlp.up_proj.weight")
    assert_names(error, "model.layers.7.mlp.up_proj.weight", tmp_path, "index lists")


def test_wrong_shape(tmp_path):
    save_checkpoint(tmp_path, CONFIG, tiny_weights())
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path).load("model.norm.weight", shape=(16,))
    assert_names(error, "model.norm.weight", tmp_path / "model.safetensors", "(32,)", "(16,)")


def test_unsupported_dtype(tmp_path):
    save_checkpoint(tmp_path, CONFIG, {"model.norm.weight": torch.arange(32, dtype=torch.int32)})
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path).load("model.norm.weight")
    assert_names(error, "model.norm.weight", tmp_path / "model.safetensors", "I32")


def test_fp8_without_scale_or_with_wrong_scale(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    fp8, scale = quantize_fp8_blockwise(torch.randn(200, 32))
    save_checkpoint(tmp_path / "bare", CONFIG, {name: fp8})
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path / "bare").load(name)
    assert_names(error, name, tmp_path / "bare" / "model.safetensors", name + "_scale_inv")

    save_checkpoint(tmp_path / "bad", CONFIG, {name: fp8, name + "_scale_inv": scale[:1]})
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path / "bad").load(name)
    assert_names(error, name + "_scale_inv", tmp_path / "bad" / "model.safetensors", "(1, 1)", "(2, 1)")


def test_bad_config(tmp_path):
    with pytest.raises(ConfigError) as error:
        Checkpoint(tmp_path)
    assert_names(error, tmp_path / "config.json")

    raw = CONFIG.to_dict() | {"model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as error:
        Checkpoint(tmp_path)
    assert_names(error, tmp_path / "config.json", "model_type", "llama")


def test_missing_weights_and_overwrite(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict()))
    with pytest.raises(CheckpointError) as error:
        Checkpoint(tmp_path)
    assert_names(error, tmp_path, "model.safetensors")

    save_checkpoint(tmp_path, CONFIG, tiny_weights())
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(tmp_path, CONFIG, tiny_weights(), max_shard_bytes=1)
    assert_names(error, tmp_path, "model.safetensors")
