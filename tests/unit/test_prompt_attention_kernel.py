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


def reference(q_nope, q_pe, k_nope, k_pe, v, lengths, scale):
    q = torch.cat([q_nope, q_pe], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1)], dim=-1)
    outs, start = [], 0
    for n in lengths:
        qq, kk, vv = (t[start:start + n].float().transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


def inputs(lengths, heads=8, nope_dim=32, rope_dim=16, value_dim=32, dtype=torch.float32, seed=0):
    """q_nope, q_pe, k_nope, k_pe (one rope key per token, for every head), v."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    shapes = [(T, heads, nope_dim), (T, heads, rope_dim), (T, heads, nope_dim), (T, rope_dim), (T, heads, value_dim)]
    return tuple(torch.randn(*shape, generator=g).to(dtype) for shape in shapes)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 17, 40], [100, 100], [300]])  # partial tiles, many blocks of keys
def test_each_prompt_attends_causally_to_itself(dtype, tolerance, lengths):
    parts = inputs(lengths, dtype=dtype)
    with torch.no_grad():
        got = prompt_attention.prompt_attention(*parts, lengths, 0.2)
    want = reference(*parts, lengths, 0.2)
    assert got.dtype == dtype and got.shape == parts[-1].shape
    assert float((got.float() - want).norm() / want.norm()) < tolerance


def test_odd_parts_and_strided_inputs_as_attention_makes_them():
    """Parts of odd widths (a pair of key dims spanning both), rows strided as MLA's splits leave them: q_nope and
    q_pe slices of one projection's rows, k_nope a slice of the expanded keys and values; the last dims contiguous."""
    q_nope, q_pe, k_nope, k_pe, v = inputs([9, 23], nope_dim=31, rope_dim=17)
    projected = torch.cat([q_nope, q_pe], dim=-1)
    expanded = torch.cat([k_nope, v], dim=-1)
    got = prompt_attention.prompt_attention(projected[..., :31], projected[..., 31:], expanded[..., :31], k_pe,
                                            expanded[..., 31:], [9, 23], 0.3)
    torch.testing.assert_close(got, reference(q_nope, q_pe, k_nope, k_pe, v, [9, 23], 0.3), rtol=1e-5, atol=1e-5)


def test_bad_inputs_get_clear_errors():
    q_nope, q_pe, k_nope, k_pe, v = inputs([4, 4])
    attend = prompt_attention.prompt_attention
    with pytest.raises(RuntimeError, match="lengths sum to 7, not the 8 tokens"):
        attend(q_nope, q_pe, k_nope, k_pe, v, [4, 3], 1.0)
    with pytest.raises(RuntimeError, match="lengths must be positive"):
        attend(q_nope, q_pe, k_nope, k_pe, v, [8, 0], 1.0)
    with pytest.raises(RuntimeError, match="value dim must be a multiple of 32"):
        attend(q_nope, q_pe, k_nope, k_pe, v[..., :24], [4, 4], 1.0)
    with pytest.raises(RuntimeError, match="must have one dtype"):
        attend(q_nope, q_pe, k_nope.bfloat16(), k_pe, v, [4, 4], 1.0)
    with pytest.raises(RuntimeError, match=r"k_pe \[T, R\]"):
        attend(q_nope, q_pe, k_nope, k_pe[:, None], v, [4, 4], 1.0)
    with pytest.raises(RuntimeError, match="last dim contiguous"):
        attend(q_nope, q_pe, k_nope, k_pe.t().contiguous().t(), v, [4, 4], 1.0)
    assert not prompt_attention.applies(q_nope, q_pe, k_nope, k_pe, v[..., :24])
    assert not prompt_attention.applies(q_nope, q_pe[..., :15], k_nope, k_pe, v)  # an odd key dim
    assert not prompt_attention.applies(q_nope.requires_grad_(), q_pe, k_nope, k_pe, v)


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
