"""The CPU kernel of decode attention over the paged latent cache (`tandem.kernels.mla_decode`), built here with
the machine's compiler, against attention written out densely."""

from pathlib import Path

import pytest
import torch

from tandem.kernels import mla_decode
from tandem.kernels.tiles import pack_model_
from tandem.model.attention_metadata import Paged
from tandem.model.loading import load_model

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def dense_attention(q_nope, q_pe, w_kv, cache, block_tables, positions, block_size, scale):
    """Absorbed MLA written out: queries into the latent by W_UK, softmax(scale * q . keys^T) . latents over
    positions 0..p of each row's sequence, values by W_UV; in float64."""
    B, Q, H, N = q_nope.shape
    C = w_kv.shape[2]
    w_uk, w_uv = w_kv.double().split_with_sizes([N, w_kv.shape[1] - N], dim=1)
    tables = block_tables.shape[1]
    slots = (block_tables[:, :, None] * block_size + torch.arange(block_size)).reshape(B, tables * block_size)
    keys = cache.double()[slots]  # [B, S, C+R]
    q = torch.cat([torch.einsum("bqhn,hnc->bqhc", q_nope.double(), w_uk), q_pe.double()], dim=-1)
    scores = torch.einsum("bqhd,bsd->bqhs", q, keys) * scale
    visible = torch.arange(tables * block_size)[None, None, None, :] <= positions.view(B, Q, 1, 1)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    latent = torch.einsum("bqhs,bsc->bqhc", probs, keys[..., :C])
    return torch.einsum("bqhc,hvc->bqhv", latent, w_uv).float()


def random_step(B, Q, H, latent_dim, rope_dim, block_size, N, dtype, nope_dim=16, value_dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = B * N + 3
    cache = torch.randn(num_blocks * block_size, latent_dim + rope_dim, generator=g).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=g)[:B * N].view(B, N)
    positions = torch.randint(0, N * block_size, (B * Q,), generator=g)
    positions[0] = 0  # a padding row sees one key
    positions[-1] = N * block_size - 1  # a row sees every position of its table
    q_nope = torch.randn(B, Q, H, nope_dim, generator=g)
    q_pe = torch.randn(B, Q, H, rope_dim, generator=g) * 2
    w_kv = (torch.randn(H, nope_dim + value_dim, latent_dim, generator=g) * latent_dim ** -0.5).to(dtype)
    return q_nope, q_pe, w_kv, cache, block_tables, positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Q,H,latent_dim,rope_dim,block_size,N", [
    (5, 1, 8, 64, 16, 16, 4),  # the bundled model's dims
    (3, 3, 16, 32, 8, 4, 9),  # a decode step verifying two drafts; rows of 40, key counts not a multiple of 8
    (1, 1, 8, 128, 64, 8, 70),  # one sequence, a long context
])
def test_the_kernel_attends_as_dense_attention(dtype, B, Q, H, latent_dim, rope_dim, block_size, N):
    inputs = random_step(B, Q, H, latent_dim, rope_dim, block_size, N, dtype)
    scale = (16 + rope_dim) ** -0.5
    got = mla_decode.paged_decode(*inputs, block_size, scale)
    want = dense_attention(*inputs, block_size, scale)
    assert got.shape == (B, Q, H, 24) and got.dtype == torch.float32
    # float32 products of the cached values; on a CPU with AVX512-BF16 a bfloat16 cache's products are bfloat16
    # ones (the queries and probabilities rounded to bfloat16, as a GPU's bfloat16 attention rounds them)
    tolerance = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_the_kernel_refuses_what_it_cannot_attend():
    q_nope, q_pe, w_kv, cache, tables, positions = random_step(2, 1, 8, 64, 16, 16, 2, torch.float32)
    attend = mla_decode.paged_decode
    with pytest.raises(RuntimeError, match="position 32 outside the 32 positions"):
        attend(q_nope, q_pe, w_kv, cache, tables, torch.tensor([3, 32]), 16, 1.0)
    with pytest.raises(RuntimeError, match="block 99 outside the cache's 7"):
        attend(q_nope, q_pe, w_kv, cache, torch.tensor([[0, 1], [2, 99]]), positions, 16, 1.0)
    with pytest.raises(RuntimeError, match="heads must be a multiple of 8, got 4"):
        attend(q_nope[:, :, :4], q_pe[:, :, :4], w_kv[:4], cache, tables, positions, 16, 1.0)
    with pytest.raises(RuntimeError, match="cache's latent width must be a multiple of 16, got 56"):
        attend(q_nope, q_pe, w_kv, cache[:, 8:].contiguous(), tables, positions, 16, 1.0)
    with pytest.raises(RuntimeError, match=r"uk_tiles \(W_UK\^T, per head\) must be a weight of 64 x 16 Float"):
        attend(q_nope, q_pe, w_kv.bfloat16(), cache, tables, positions, 16, 1.0)
    with pytest.raises(RuntimeError, match=r"uv_tiles \(W_UV, per head\) must be a weight of 24 x 64 Float"):
        uk_tiles = mla_decode.absorption_tiles(w_kv, 16)[0]
        attend(q_nope, q_pe, w_kv, cache, tables, positions, 16, 1.0,
               tiles=(uk_tiles, mla_decode.absorption_tiles(w_kv[..., :32], 16)[1]))  # W_UV of a narrower latent
    with pytest.raises(RuntimeError, match="cache must be float32, bfloat16 or float16"):
        attend(q_nope, q_pe, w_kv.double(), cache.double(), tables, positions, 16, 1.0)
    assert mla_decode.supports(16, 512) and not mla_decode.supports(4, 64) and not mla_decode.supports(8, 40)


@pytest.mark.parametrize("step", ["graphed", "eager"])
def test_a_decode_step_attends_alike_in_the_kernel_and_in_tensor_operations(step, monkeypatch):
    """The bundled model's first layer on a decode step's metadata, with and without the kernel: a graphed step's
    (`Paged.from_block_tables`) and an eager one's (`Paged.build`)."""
    model = load_model(MODEL, dtype=torch.float32)
    attention = model.main_layers[0].self_attn
    config = model.config
    B, block_size, N = 4, 16, 3
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(1, (B * N + 1) * block_size, config.kv_lora_rank + config.qk_rope_head_dim, generator=g)
    tables = torch.randperm(B * N, generator=g).view(B, N) + 1
    positions = torch.tensor([0, 5, 17, 47])  # a sequence at its first position, then longer ones
    slots = tables[torch.arange(B), positions // block_size] * block_size + positions % block_size
    x = torch.randn(B, config.hidden_size, generator=g)

    def metadata(cache):
        if step == "graphed":
            return Paged.from_block_tables(positions, slots, tables, block_size, [cache[0]])
        return Paged.build(query_lens=[1] * B, context_lens=(positions + 1).tolist(), block_tables=tables.tolist(),
                           block_size=block_size, kv_cache=cache)

    def attend():
        meta = metadata(kv.clone())
        assert meta.block_tables is not None
        return attention(x, meta, model.rope_tables(meta, torch.float32))

    with torch.no_grad():
        in_kernel = attend()
        pack_model_(model)  # the absorptions packed once, as an engine packs them, not on every call
        assert attention.uk_tiles is not None
        in_kernel_prepared = attend()
        monkeypatch.setattr(mla_decode, "supports", lambda *dims: False)
        in_tensor_ops = attend()
    torch.testing.assert_close(in_kernel, in_tensor_ops, rtol=1e-5, atol=1e-5)
    # (packed, the projections run in the linear kernel too: float32 sums in another order)
    torch.testing.assert_close(in_kernel_prepared, in_tensor_ops, rtol=1e-5, atol=1e-5)


def test_a_model_packs_the_absorptions_once_in_place_and_drops_them_when_converted():
    model = load_model(MODEL, dtype=torch.bfloat16)
    attention = model.main_layers[0].self_attn
    assert attention.uk_tiles is None and pack_model_(model) > 0
    packed = attention.uk_tiles, attention.uv_tiles
    per_head = attention.kv_b_proj.weight.view(attention.num_heads, -1, attention.kv_lora_rank)
    for got, want in zip(packed, mla_decode.absorption_tiles(per_head, attention.qk_nope_head_dim)):
        assert torch.equal(got, want)
    before = [t.clone() for t in packed]
    with torch.no_grad():
        attention.kv_b_proj.weight.mul_(2)
    pack_model_(model)  # in place: a compiled pass reading them follows
    for got, old, tiles in zip(packed, before, (attention.uk_tiles, attention.uv_tiles)):
        assert tiles is got and torch.equal(got, 2 * old)
    model.float()
    assert attention.uk_tiles is None and attention.uv_tiles is None


def test_only_steps_of_a_query_grid_over_the_cache_carry_block_tables():
    """Prompts' first chunks attend to themselves, and a step of uneven token counts is no [B, Q] grid."""
    cache = torch.zeros(1, 64, 80)
    tables = [[0, 1], [2, 3]]
    assert Paged.build(query_lens=[1, 1], context_lens=[20, 9], block_tables=tables, block_size=16,
                       kv_cache=cache).block_tables.tolist() == tables
    assert Paged.build(query_lens=[3, 3], context_lens=[3, 3], block_tables=tables, block_size=16,
                       kv_cache=cache).block_tables is None
    assert Paged.build(query_lens=[2, 1], context_lens=[20, 9], block_tables=tables, block_size=16,
                       kv_cache=cache).block_tables is None
