"""The CPU kernel of a decode step's weight-absorbed MLA attention over the paged cache.

Written as tensor operations, a compiled CPU decode step gathers every sequence's keys from the cache into a
[batch, context, kv_lora_rank + rope] float32 tensor, multiplies the queries by it and its latent part by the
probabilities in batched matmuls, and softmaxes [batch, heads, context] scores in between: at the bundled model's
batch-32 step on a 2-core Xeon the gather alone moved 4 MB per layer and took as long as the two matmuls. The kernel
(`mla_decode.cpp`) attends one query row at a time instead, from the blocks its block table names, over its own
positions (not the context padded to the graph's bucket), with every intermediate in the core's cache; it also
absorbs the queries into the latent and projects the result to each head's value (`kv_b_proj`), where the step
made two more batched matmuls, in the feed-forward kernels' register tiles over W_UK^T and W_UV packed once
(`absorption_tiles`; at batch 32, 192 positions, bfloat16: 81-82 against 100-101 us a call with the products one
float32 vector at a time, the weights converted as read). Its products are float32 ones of the cached values,
except over a bfloat16 cache on a CPU with AVX512-BF16, where they are `vdpbf16ps`'s: bfloat16 products summed in
float32, the queries and the probabilities rounded to bfloat16 as a GPU's bfloat16 attention rounds them, twice the
products per instruction (at the bundled model's batch-32 step on a 2-core EPYC, Zen 4: 139 against 228 us a layer
over 192 positions).

It is part of the CPU kernels' library (`tandem.kernels.library`), which a CPU engine builds when it starts, as the
operator `torch.ops.tandem.mla_paged_decode`, which eager steps call and `torch.export` traces into AOTInductor's
libraries. Where the library cannot be built, attention runs as tensor operations.
"""

from __future__ import annotations

import torch

from tandem.kernels import library
from tandem.kernels.tiles import repack

HEADS_MULTIPLE = 8  # the kernel scores 8 heads per vector
LATENT_MULTIPLE = 16  # and sums the latent 16 columns at a time

library.OPS.define("mla_paged_decode(Tensor q_nope, Tensor q_pe, Tensor uk_tiles, Tensor uv_tiles, int value_dim, "
                   "Tensor cache, Tensor block_tables, Tensor positions, int block_size, float scale) -> Tensor")


@torch.library.register_fake("tandem::mla_paged_decode")
def _(q_nope, q_pe, uk_tiles, uv_tiles, value_dim, cache, block_tables, positions, block_size, scale):
    """The output's shape, for torch.export to trace the operator."""
    return q_nope.new_empty(*q_nope.shape[:3], value_dim)


def fits(num_heads: int, kv_lora_rank: int) -> bool:
    """Whether the kernel serves attention of these dims."""
    return num_heads % HEADS_MULTIPLE == 0 and kv_lora_rank % LATENT_MULTIPLE == 0


def supports(num_heads: int, kv_lora_rank: int) -> bool:
    """Whether the kernel is loaded and serves attention of these dims."""
    return library.loaded() and fits(num_heads, kv_lora_rank)


def absorption_tiles(w_kv: torch.Tensor, nope_dim: int,
                     packed: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """`kv_b_proj`'s weight per head w_kv [H, N + V, C] as the kernel's tiles read it (`tiles.pack`): W_UK^T [C, N]
    per head, which absorbs the queries into the latent, and W_UV [V, C], which projects the attended latent to the
    values; into `packed` where it holds an earlier packing (`tiles.repack`: compiled passes read it in place). A
    model packs them once (`MLA.pack_tiles_`); the library must be loaded."""
    return repack(packed[0], w_kv[:, :nope_dim].transpose(1, 2)), repack(packed[1], w_kv[:, nope_dim:])


def paged_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, w_kv: torch.Tensor, cache: torch.Tensor,
                 block_tables: torch.Tensor, positions: torch.Tensor, block_size: int, scale: float,
                 tiles: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Each head's value [B, Q, H, V] float32 of weight-absorbed MLA attention: the no-rope queries q_nope
    [B, Q, H, N] and rope queries q_pe [B, Q, H, R] (float32), `kv_b_proj`'s weight per head w_kv [H, N + V, C] (W_UK
    then W_UV, in the cache's dtype; `tiles` the kernel's packing of it, `absorption_tiles`, made here where not
    given), each query attending to the cached positions 0 to its own (`positions` [B*Q]) of its sequence
    (block_tables [B, num_blocks] of cache [slots, C + R], `block_size` slots per block), with softmax `scale`."""
    nope_dim = q_nope.shape[-1]
    uk_tiles, uv_tiles = tiles if tiles is not None else absorption_tiles(w_kv, nope_dim)
    return torch.ops.tandem.mla_paged_decode(q_nope, q_pe, uk_tiles, uv_tiles, w_kv.shape[1] - nope_dim, cache,
                                             block_tables, positions, block_size, scale)
