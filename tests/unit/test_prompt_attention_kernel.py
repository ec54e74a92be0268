"""The CPU kernel of prompts' causal attention (`tandem.kernels.prompt_attention`) against the fused kernel of
`scaled_dot_product_attention` in float32, alone and in the bundled model's prefill."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import library, prompt_attention
from tandem.model.attention_metadata import Paged
from tandem.model.loading import load_model

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def reference(q, k, v, lengths, scale):
    outs, start = [], 0
    for n in lengths:
        qq, kk, vv = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


def inputs(lengths, heads=8, key_dim=48, value_dim=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k = (torch.randn(T, heads, key_dim, generator=g).to(dtype) for _ in range(2))
    return q, k, torch.randn(T, heads, value_dim, generator=g).to(dtype)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 17, 40], [100, 100], [300]])  # partial tiles, many blocks of keys
def test_each_prompt_attends_causally_to_itself(dtype, tolerance, lengths):
    q, k, v = inputs(lengths, dtype=dtype)
    with torch.no_grad():
        got = prompt_attention.prompt_attention(q, k, v, lengths, 0.2)
    want = reference(q, k, v, lengths, 0.2)
    assert got.dtype == dtype and got.shape == v.shape
    assert float((got.float() - want).norm() / want.norm()) < tolerance


def test_strided_inputs_as_attention_makes_them():
    """q a slice of wider rows, k a concatenation's view: rows strided, the last dim contiguous."""
    q, k, v = inputs([9, 23])
    wide = torch.cat([q, torch.zeros(32, 8, 16)], dim=-1)
    got = prompt_attention.prompt_attention(wide[..., :48], k, v, [9, 23], 0.3)
    torch.testing.assert_close(got, reference(q, k, v, [9, 23], 0.3), rtol=1e-5, atol=1e-5)


def test_bad_inputs_get_clear_errors():
    q, k, v = inputs([4, 4])
    attend = prompt_attention.prompt_attention
    with pytest.raises(RuntimeError, match="lengths sum to 7, not the 8 tokens"):
        attend(q, k, v, [4, 3], 1.0)
    with pytest.raises(RuntimeError, match="lengths must be positive"):
        attend(q, k, v, [8, 0], 1.0)
    with pytest.raises(RuntimeError, match="value dim must be a multiple of 32"):
        attend(q, k, v[..., :24], [4, 4], 1.0)
    with pytest.raises(RuntimeError, match="must have one dtype"):
        attend(q, k.bfloat16(), v, [4, 4], 1.0)
    assert not prompt_attention.applies(q, k, v[..., :24]) and not prompt_attention.applies(q.requires_grad_(), k, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_bundled_models_prefill_matches_with_and_without_the_kernel(monkeypatch, dtype):
    model = load_model(MODEL, dtype=dtype)
    config = model.config
    lens, block_size = [7, 30, 30], 16
    ids = torch.randint(2, config.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(3))

    def prefill():
        cache = torch.zeros(config.num_kv_layers, 8 * block_size, config.kv_cache_dim, dtype=dtype)
        meta = Paged.build(query_lens=lens, context_lens=lens, block_tables=[[0], [1, 2], [3, 4]],
                           block_size=block_size, kv_cache=cache)
        return model.logits(model(ids, meta)).float()

    with torch.no_grad():
        assert prompt_attention.applies(*inputs([1], dtype=dtype))
        got = prefill()
        monkeypatch.setattr(prompt_attention, "applies", lambda *tensors: False)
        want = prefill()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    monkeypatch.setattr(library, "_loaded", False)
    assert not prompt_attention.applies(*inputs([1]))
