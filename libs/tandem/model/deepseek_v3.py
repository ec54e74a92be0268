"""DeepSeek-V3, in the order of the paper: RMSNorm -> RoPE/YaRN -> MLA -> MLP -> Gate -> MoE -> Block ->
Transformer -> Multi-Token Prediction.

Module and parameter names follow the Hugging Face checkpoint (`kv_lora_rank`, `e_score_correction_bias`,
`eh_proj`, ...), so a state-dict key is a checkpoint key, except that routed experts are stacked per layer
(see `tandem.model.loading`). The model sees a flat list of tokens; `attention_metadata` says how they
are grouped into sequences and where their KV cache lives.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tandem.kernels import ffn, layer_ops, mla_decode, prompt_attention
from tandem.kernels.linear import Linear, linear, pack_for_linear
from tandem.kernels.tiles import HoldsTiles, packs
from tandem.model.attention_metadata import AttentionMetadata, DenseCausal, Paged
from tandem.model.config import ModelConfig, RopeConfig
from tandem.moe.experts import ExpertBank, LocalExperts
from tandem.moe.placement import Placement
from tandem.moe.routing import route


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, scaled in the model's dtype, as DeepSeek's reference code does
        if self.weight.dtype == x.dtype and layer_ops.applies(x, self.weight):
            return layer_ops.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # the same, in one call
            return torch.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


# --- Rotary position embedding, with YaRN context extension ------------------------------------------------

def rope_inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """Inverse frequencies [dim/2]; YaRN blends interpolated and extrapolated frequencies by wavelength."""
    base = rope.rope_theta
    extrapolated = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if not rope.is_yarn:
        return extrapolated.float()
    interpolated = extrapolated / rope.factor
    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    keep_extrapolated = 1 - ramp
    return (interpolated.float() * ramp + extrapolated.float() * keep_extrapolated)


@dataclass(slots=True)
class RopeTables:
    """cos and sin [T, 1, R/2] at the positions of one forward pass, looked up once and shared by its layers."""

    cos: torch.Tensor
    sin: torch.Tensor
    interleave: bool

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, R] rotated. With `interleave` the rotated pairs are (x0, x1), (x2, x3), ... as DeepSeek
        stores them, else the two halves. Either way the output is laid out as [rotated evens | rotated odds];
        queries and keys get the same layout so their dot products are unchanged."""
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin], dim=-1)

    def rotate_query_and_key(self, q_pe: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotate` of the rope queries [T, H, R] and of the rope key [T, R] shared by every head."""
        if self.cos.dtype == q_pe.dtype and layer_ops.applies(q_pe):
            return tuple(layer_ops.rope(x, self.cos, self.sin, self.interleave) for x in (q_pe, k_pe[:, None]))
        # as one more head: one rotation for both
        return self.rotate(torch.cat([q_pe, k_pe[:, None]], dim=1)).split_with_sizes([q_pe.shape[1], 1], dim=1)


class RotaryEmbedding(nn.Module):
    """Decoupled RoPE on the last `qk_rope_head_dim` dims of queries and of the shared key: the cos/sin tables
    of every position, and the lookup of a pass's positions in them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.interleave = config.rope_interleave
        inv_freq = rope_inv_freq(config.rope, config.qk_rope_head_dim)
        t = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        scale = config.rope.cos_sin_scale
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        return RopeTables(self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype),
                          self.interleave)


# --- Multi-head Latent Attention ---------------------------------------------------------------------------

class MLA(HoldsTiles):
    """Multi-head Latent Attention.

    Queries pass through a low-rank bottleneck (`q_a_proj -> q_a_layernorm -> q_b_proj`, or one `q_proj` when
    `q_lora_rank` is None). Keys and values are compressed into one latent c_kv of `kv_lora_rank` plus a
    decoupled rope key shared by all heads; only those are cached. `kv_b_proj` expands the latent into per-head
    no-rope keys (W_UK) and values (W_UV). Training and prompt chunks expand them; decode steps absorb W_UK into
    the query and W_UV into the output, attending over the cached latent directly (`_expanding_pays`).
    """

    TILES = ("uk_tiles", "uv_tiles")  # kv_b_proj's W_UK^T and W_UV packed for the CPU decode kernel

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        H, D = self.num_heads, config.hidden_size
        if config.q_lora_rank is None:
            self.q_proj = Linear(D, H * config.qk_head_dim)
        else:
            self.q_a_proj = Linear(D, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(config.q_lora_rank, H * config.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(D, config.kv_lora_rank + config.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = Linear(H * config.v_head_dim, D)

    def pack_tiles_(self) -> bool:
        """Pack W_UK^T and W_UV for the CPU decode kernel (`mla_decode.absorption_tiles`), in place where packed
        before (compiled passes read them there), where the kernel serves this attention."""
        weight = self.kv_b_proj.weight
        if not (packs(weight) and mla_decode.fits(self.num_heads, self.kv_lora_rank)):
            return False
        self.uk_tiles, self.uv_tiles = mla_decode.absorption_tiles(
            self._kv_b_per_head(weight), self.qk_nope_head_dim, (self.uk_tiles, self.uv_tiles))
        return True

    def _kv_b_per_head(self, weight: torch.Tensor) -> torch.Tensor:
        """kv_b_proj's weight per head [H, N + V, C]: W_UK, then W_UV."""
        return weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RopeTables) -> torch.Tensor:
        # T tokens, H heads, C kv_lora_rank, R rope dim, N no-rope dim, V value dim
        T = x.shape[0]
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, self.num_heads, -1)
        # split_with_sizes, not split: Tensor.split's Python wrapper costs more than the split on a decode step
        q_nope, q_pe = q.split_with_sizes([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split_with_sizes([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe, k_pe = rope.rotate_query_and_key(q_pe, k_pe)
        k_pe = k_pe.squeeze(1)
        if isinstance(meta, DenseCausal):
            out = self._attend_expanded(q_nope, q_pe, c_kv, k_pe, meta)
        else:
            out = self._attend_paged(q_nope, q_pe, c_kv, k_pe, meta)
        return self.o_proj(out.reshape(T, -1))

    def _expand(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [..., H, N+R] and values [..., H, V] from latents [..., C] and rope keys [..., R]."""
        k_nope, v = self._expand_latent(c_kv)
        return self._with_rope_key(k_nope, k_pe), v

    def _expand_latent(self, c_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head no-rope keys [..., H, N] and values [..., H, V] from latents [..., C]."""
        return self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, -1)).split_with_sizes(
            [self.qk_nope_head_dim, self.v_head_dim], dim=-1)

    @staticmethod
    def _with_rope_key(k_nope: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """Per-head keys [..., H, N+R]: the no-rope keys, then the rope key every head shares."""
        return torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], -1)], dim=-1)

    def _fused_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                         causal: bool = False) -> torch.Tensor:
        """[B, L, H, V] from queries and keys [B, L|S, H, N+R] and values [B, S, H, V], in the fused kernel: values
        are zero-padded to the query/key head size, since it wants one head size for all three (and 4-d inputs)."""
        v = F.pad(v, (0, q.shape[-1] - self.v_head_dim))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                             is_causal=causal, scale=self.softmax_scale)
        return out.transpose(1, 2)[..., : self.v_head_dim]

    def _attend_expanded(self, q_nope, q_pe, c_kv, k_pe, meta: DenseCausal) -> torch.Tensor:
        B, L = meta.batch_size, meta.seq_len
        k, v = self._expand(c_kv, k_pe)
        q = torch.cat([q_nope, q_pe], dim=-1).view(B, L, self.num_heads, -1)
        # not `_fused_attention`: its padded values round differently, and the references were fixed on this
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.view(B, L, *k.shape[1:]).transpose(1, 2),
                                             v.view(B, L, *v.shape[1:]).transpose(1, 2), is_causal=True,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2)  # [B, L, H, V]

    def _attend_prompts(self, q_nope, q_pe, c_kv, k_pe, lengths: list[int]) -> torch.Tensor:
        """Sequences with nothing before them, their tokens one sequence after another (`lengths`): each attends
        causally to itself, over keys and values expanded from its own latents, in the fused kernel (no cache
        read, no padding, the masked half of each sequence's blocks skipped). Sequences of one length run as one
        batch; on the CPU the kernel (`tandem.kernels.prompt_attention`) runs them where it applies. Returns
        [T, H, V]."""
        k_nope, v = self._expand_latent(c_kv)  # [T, H, N], [T, H, V]
        if prompt_attention.applies(q_nope, q_pe, k_nope, k_pe, v):
            return prompt_attention.prompt_attention(q_nope, q_pe, k_nope, k_pe, v, lengths, self.softmax_scale)
        q, k = torch.cat([q_nope, q_pe], dim=-1), self._with_rope_key(k_nope, k_pe)  # [T, H, N+R]
        if len(set(lengths)) == 1:
            out = self._fused_attention(*(t.view(-1, lengths[0], *t.shape[1:]) for t in (q, k, v)), causal=True)
            return out.flatten(0, 1)
        starts = itertools.accumulate(lengths, initial=0)
        return torch.cat([self._fused_attention(*(t[None, s:s + n] for t in (q, k, v)), causal=True)[0]
                          for s, n in zip(starts, lengths)])

    def _attend_paged(self, q_nope, q_pe, c_kv, k_pe, meta: Paged) -> torch.Tensor:
        """Cache the new tokens' latents, then attend over every sequence's context in the cheaper form."""
        # B sequences, Q query rows each, S context positions
        cache = meta.kv_cache[self.layer_idx]
        cache.index_copy_(0, meta.slot_mapping, torch.cat([c_kv, k_pe], dim=-1).to(cache.dtype))
        B, Q = meta.num_seqs, meta.max_query_len
        if meta.first_chunk_lens is not None and self._expanding_pays(Q, Q):
            return self._attend_prompts(q_nope, q_pe, c_kv, k_pe, meta.first_chunk_lens)
        if meta.block_tables is not None and cache.device.type == "cpu" and \
                mla_decode.supports(self.num_heads, self.kv_lora_rank) and \
                not self._expanding_pays(Q, meta.block_tables.shape[1] * meta.block_size):
            return self._attend_latent_by_block(q_nope, q_pe, cache, meta).to(q_nope.dtype)
        # index_select, not cache[key_slots]: several times faster for whole rows on CPU
        keys = cache.index_select(0, meta.key_slots).view(B, -1, cache.shape[-1])  # [B, S, C+R]
        if self._expanding_pays(Q, keys.shape[1]):
            out = self._attend_expanded_keys(q_nope, q_pe, keys.to(q_nope.dtype), meta)  # [B*Q, H, V]
        else:
            dtype = latent_attention_dtype(q_nope)
            out = self._attend_latent(q_nope.to(dtype), q_pe.to(dtype), keys.to(dtype), meta).to(q_nope.dtype)
        return out if meta.query_rows is None else out.index_select(0, meta.query_rows)  # [T, H, V]

    def _expanding_pays(self, query_len: int, context_len: int) -> bool:
        """Whether expanding the context into per-head keys and values costs fewer multiplies than attending over
        the latent. Expanding costs C*(N+V) per context position and head; then each (query, key, head) costs
        N+R+V instead of C+R+C, and no query or output is projected through W_UK / W_UV. So a prompt chunk
        expands and a decode step (a few queries over a long context) does not, as DeepSeek-V3 serves prefill and
        decode. Expanded attention also runs as one fused kernel (`scaled_dot_product_attention`)."""
        C, N, V = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        return (context_len - query_len) * C * (N + V) < query_len * context_len * (2 * C - N - V)

    def _attend_expanded_keys(self, q_nope, q_pe, keys, meta: Paged) -> torch.Tensor:
        k, v = self._expand(*keys.split_with_sizes([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1))
        q = torch.cat([q_nope, q_pe], dim=-1)
        q = q[meta.query_index] if meta.query_index is not None else q.view(keys.shape[0], -1, *q.shape[1:])
        mask = meta.attend_bias.transpose(1, 2).to(q.dtype)  # [B, 1, Q, S]
        return self._fused_attention(q, k, v, mask).flatten(0, 1)  # [B*Q, H, V]

    def _attend_latent(self, q_nope, q_pe, keys, meta: Paged) -> torch.Tensor:
        """Weight-absorbed: W_UK folds into the queries, which attend over the cached latents directly, and W_UV
        projects the attended latent to each head's value."""
        H, C = self.num_heads, self.kv_lora_rank
        w_kv = self._kv_b_per_head(self.kv_b_proj.weight).to(keys.dtype)
        w_uk, w_uv = w_kv.split_with_sizes([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # [H, N, C], [H, V, C]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, C]
        q_full = torch.cat([q_latent, q_pe], dim=-1)  # [T, H, C+R]
        if meta.query_index is not None:
            q_full = q_full[meta.query_index]
        B, Q = meta.num_seqs, meta.max_query_len
        scores = torch.bmm(q_full.reshape(B, Q * H, -1), keys.transpose(1, 2)).float().view(B, Q, H, -1)
        probs = (scores * self.softmax_scale + meta.attend_bias).softmax(-1).to(keys.dtype)
        out_latent = torch.bmm(probs.view(B, Q * H, -1), keys[..., :C])  # [B, Q*H, C]
        out = torch.bmm(out_latent.view(B * Q, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # [H, B*Q, V]
        return out.transpose(0, 1)

    def _attend_latent_by_block(self, q_nope, q_pe, cache, meta: Paged) -> torch.Tensor:
        """As `_attend_latent`, in float32, in the CPU kernel (`tandem.kernels.mla_decode`): the queries' absorption,
        attention reading each sequence's keys from its cache blocks, and the value projection. For a step whose T
        tokens are the [B, Q] query grid, graphed or eager."""
        B, Q, H = meta.num_seqs, meta.max_query_len, self.num_heads
        w_kv = self._kv_b_per_head(self.kv_b_proj.weight).to(cache.dtype)
        packed = self.uk_tiles is not None and self.uk_tiles.dtype == cache.dtype
        out = mla_decode.paged_decode(q_nope.float().view(B, Q, H, -1), q_pe.float().view(B, Q, H, -1), w_kv, cache,
                                      meta.block_tables, meta.positions, meta.block_size, self.softmax_scale,
                                      (self.uk_tiles, self.uv_tiles) if packed else None)  # [B, Q, H, V]
        return out.view(B * Q, H, -1)


def latent_attention_dtype(q: torch.Tensor) -> torch.dtype:
    """What the weight-absorbed attention computes in: float32 on the CPU, else the model's dtype. Its batched
    matmuls are small (a few query rows per sequence and head), and oneDNN's bfloat16 ones cost about 40 us each
    whatever their size on a Xeon with AMX, 2-4x MKL's float32 ones at the bundled model's batch-32 shapes."""
    return torch.float32 if q.device.type == "cpu" else q.dtype


# --- Feed-forward: dense MLP and DeepSeekMoE ---------------------------------------------------------------

class MLP(nn.Module):
    """SwiGLU feed-forward; the dense layers, and the shared experts of a MoE layer."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size)
        self.up_proj = Linear(hidden_size, intermediate_size)
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ffn.runs_mlp(x, self.gate_proj, self.up_proj, self.down_proj):  # a decode step's few rows
            return ffn.mlp(x, self.gate_proj.tiles, self.up_proj.tiles, self.down_proj.tiles)
        return self.down_proj(layer_ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class Gate(HoldsTiles):
    """The router: token-to-expert affinities, computed in float32 as DeepSeek does."""

    TILES = ("tiles",)  # the weight packed for the CPU kernel

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)

    def pack_tiles_(self) -> bool:
        self.tiles = pack_for_linear(self.weight.float(), self.tiles)
        return self.tiles is not None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        logits = linear(x.float(), self.weight.float(), self.tiles)
        return route(logits, self.e_score_correction_bias.float(), top_k=c.num_experts_per_tok, n_group=c.n_group,
                     topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
                     routed_scaling_factor=c.routed_scaling_factor)


class MoE(nn.Module):
    """DeepSeekMoE: always-on shared experts plus the routed experts the gate picks.

    Routing and expert execution are separate steps: `experts` is any callable taking
    (hidden [T, D], logical expert ids [T, K], weights [T, K]); colocated it is `LocalExperts`, in the
    cluster a dispatcher that ships tokens to expert servers.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Gate(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts) \
            if config.n_shared_experts else None
        self.experts: nn.Module = LocalExperts(
            ExpertBank(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size),
            Placement.identity(1, config.n_routed_experts).layer_table(0))
        self.route_observer = None  # called with expert ids [T, K] after routing (training's load statistics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        if self.route_observer is not None:
            self.route_observer(expert_ids)
        out = self.experts(x, expert_ids, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


# --- Transformer block and the main model -------------------------------------------------------------------

class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, rope: RopeTables) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), meta, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """An MTP module's output norm; the projection itself is the main model's `lm_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Multi-Token Prediction module k (DeepSeek-V3 section 2.2), stored as layer num_hidden_layers + k - 1.

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), then one transformer block, then
    shared_head.norm and the shared output head predict t_{i+k+1}. The embedding and output head are the
    main model's.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size)
        self.shared_head = SharedHead(config)

    def forward(self, token_embeds: torch.Tensor, prev_hidden: torch.Tensor, meta: AttentionMetadata,
                rope: RopeTables) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(token_embeds), self.hnorm(prev_hidden)], dim=-1))
        return super().forward(x, meta, rope)


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.rotary = RotaryEmbedding(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        N = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(N)]
            + [MTPLayer(config, N + k) for k in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    """The main model plus its MTP modules.

    `forward` returns the last layer's hidden states before the final norm; `mtp_input` picks what feeds the
    first MTP module: "post_norm" (what vLLM and SGLang feed DeepSeek's released weights) or "pre_norm".
    """

    def __init__(self, config: ModelConfig, mtp_input: str = "post_norm"):
        super().__init__()
        if mtp_input not in ("post_norm", "pre_norm"):
            raise ValueError(f"mtp_input must be 'post_norm' or 'pre_norm', got {mtp_input!r}")
        self.config = config
        self.mtp_input = mtp_input
        self.model = DeepseekV3Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute the derived, non-persistent tables (RoPE cos/sin, expert placement), e.g. after the model
        was built on the meta device and materialised with `to_empty`."""
        device = self.lm_head.weight.device
        fresh = RotaryEmbedding(self.config).to(device)
        self.model.rotary.cos, self.model.rotary.sin = fresh.cos, fresh.sin
        table = Placement.identity(1, self.config.n_routed_experts).layer_table(0) if self.config.n_routed_experts \
            else None
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE) and isinstance(layer.mlp.experts, LocalExperts):
                layer.mlp.experts.log2phy = table.log2phy.to(device)
                layer.mlp.experts.logcnt = table.logcnt.to(device)

    @property
    def main_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers)[: self.config.num_hidden_layers]  # slicing a ModuleList builds a module

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers)[self.config.num_hidden_layers:]

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] -> hidden states [T, D] after the last main layer, before the final norm."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rope_tables(meta, x.dtype)
        for layer in self.main_layers:
            x = layer(x, meta, rope)
        return x

    def rope_tables(self, meta: AttentionMetadata, dtype: torch.dtype) -> RopeTables:
        """The rotary tables of one pass's positions, for each of its layers."""
        return self.model.rotary(meta.positions, dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Main-model logits [T, V] (float32) from `forward`'s hidden states."""
        return self.lm_head(self.model.norm(hidden)).float()

    def mtp_hidden_from_main(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden) if self.mtp_input == "post_norm" else hidden

    def mtp_forward(self, k: int, input_ids: torch.Tensor, prev_hidden: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
        """MTP module k (0-based): input_ids [T] are the tokens one step ahead of prev_hidden's positions."""
        embeds = self.model.embed_tokens(input_ids)
        return self.mtp_layers[k](embeds, prev_hidden, meta, self.rope_tables(meta, embeds.dtype))

    def mtp_logits(self, k: int, mtp_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.mtp_layers[k].shared_head.norm(mtp_hidden)).float()
