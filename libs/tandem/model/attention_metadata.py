"""How the tokens of one forward pass are laid out, as attention needs to know it.

The model always sees a flat list of T tokens. Two layouts exist:
- `DenseCausal`: B rows of equal length L (T = B*L), causal inside a row, no cache. Training and reference.
- `Paged`: a continuous batch of B sequences, each contributing some new tokens (a prefill chunk, one decode
  token, or a token plus its drafts) on top of a context already in the paged KV cache.
Gather/scatter indices are built once per step and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class DenseCausal:
    batch_size: int
    seq_len: int
    positions: torch.Tensor  # [T] int64

    @classmethod
    def for_batch(cls, batch_size: int, seq_len: int, device: torch.device | str = "cpu") -> "DenseCausal":
        positions = torch.arange(seq_len, device=device).repeat(batch_size)
        return cls(batch_size, seq_len, positions)


@dataclass(slots=True)
class Paged:
    """New tokens of B sequences over a paged MLA cache.

    kv_cache: [num_kv_layers, num_slots, kv_lora_rank + qk_rope_head_dim], or its layers as a list (what a
    compiled forward takes, see `tandem.engine.decode_graphs`); slot = block * block_size + offset.
    When every sequence brings the same number of new tokens (decode, and verification of equal draft counts),
    the T tokens already are the [B, Q] query grid, and `query_index` / `query_rows` are None.
    """

    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, cache slot each new token's latent is written to
    query_index: torch.Tensor | None  # [B, Q] int64, index into the T new tokens (padding points at token 0)
    query_rows: torch.Tensor | None  # [T] int64, row of each new token in the flattened [B*Q] query grid
    key_slots: torch.Tensor  # [B*S] int64, cache slot of each context position (padding points at slot 0)
    attend_bias: torch.Tensor  # [B, Q, 1, S] float32, 0 where a query may attend to a key, else MASKED
    kv_cache: torch.Tensor | list[torch.Tensor]  # indexed by layer
    num_seqs: int
    max_query_len: int  # Q
    # each sequence's new tokens, when none has anything cached before them (prompts' first chunks): they attend
    # to themselves alone, and attention can skip the cache
    first_chunk_lens: list[int] | None = None
    # the step's block tables [B, N] and block size, where its tokens are the [B, Q] query grid (a graphed step's
    # key_slots and attend_bias derive from them): a kernel reading the cache by block (`tandem.kernels.mla_decode`)
    # takes them instead
    block_tables: torch.Tensor | None = None
    block_size: int = 0

    MASKED = torch.finfo(torch.float32).min
    """Added to the scores a query must not see. Finite, so that the all-masked rows of padded queries give a
    (discarded) uniform softmax instead of NaN, with no clean-up pass."""

    @classmethod
    def build(cls, *, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int, kv_cache: torch.Tensor) -> "Paged":
        """query_lens[b] new tokens of sequence b occupy its last positions; context_lens[b] counts them too."""
        return cls.from_arrays(PagedArrays.build(query_lens, context_lens, block_tables, block_size), kv_cache)

    @classmethod
    def from_block_tables(cls, positions: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                          block_size: int, kv_cache: torch.Tensor | list[torch.Tensor]) -> "Paged":
        """A padded grid of B sequences x Q new tokens (positions and slot_mapping [B*Q]) over the first N blocks
        of each sequence's cache (block_tables [B, N]), with the key slots and bias derived here by tensor ops:
        a graphed decode step builds them itself, so that the host copies B*N block ids into it per step instead
        of B*S key slots and B*Q*S biases. Each query attends to the keys at its position and before; padding
        rows (position 0) attend to the first, and their outputs are discarded."""
        B = block_tables.shape[0]
        query_pos = positions.view(B, -1)  # [B, Q]
        offsets = torch.arange(block_size, dtype=block_tables.dtype, device=block_tables.device)
        key_slots = (block_tables[:, :, None] * block_size + offsets).reshape(B, -1)  # [B, S]
        key_pos = torch.arange(key_slots.shape[1], device=positions.device)
        attend_bias = torch.where(key_pos <= query_pos[:, :, None], 0.0, cls.MASKED)[:, :, None]  # [B, Q, 1, S]
        return cls(positions, slot_mapping, None, None, key_slots.reshape(-1), attend_bias, kv_cache, B,
                   query_pos.shape[1], block_tables=block_tables, block_size=block_size)

    @classmethod
    def from_arrays(cls, a: "PagedArrays", kv_cache: torch.Tensor) -> "Paged":
        """On the CPU, a step whose tokens are the [B, Q] query grid and which attends over the cache (not
        prompts' first chunks) also carries its block tables, for the CPU kernel."""
        device = kv_cache.device
        uniform = a.query_index is None
        by_block = uniform and a.first_chunk_lens is None and device.type == "cpu"
        return cls(_to(a.positions, device), _to(a.slot_mapping, device),
                   None if uniform else _to(a.query_index, device), None if uniform else _to(a.query_rows, device),
                   _to(a.key_slots.reshape(-1), device), _to(a.attend_bias, device), kv_cache, a.num_seqs,
                   a.max_query_len, a.first_chunk_lens, _to(a.block_tables, device) if by_block else None,
                   a.block_size if by_block else 0)


@dataclass(slots=True)
class PagedStep:
    """A continuous-batching step as the scheduler hands it over: per sequence, its new tokens (query_lens), its
    context counting them (context_lens) and its cache blocks. An eager forward indexes by `arrays()`; a graphed
    decode step takes the block tables as they are (`Paged.from_block_tables`)."""

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)

    def arrays(self) -> "PagedArrays":
        return PagedArrays.build(self.query_lens, self.context_lens, self.block_tables, self.block_size)


@dataclass(slots=True)
class PagedArrays:
    """`Paged`'s indices as numpy arrays, before they go to the device (key_slots still [B, S])."""

    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    query_index: np.ndarray | None  # [B, Q]
    query_rows: np.ndarray | None  # [T]
    key_slots: np.ndarray  # [B, S]
    attend_bias: np.ndarray  # [B, Q, 1, S]
    block_tables: np.ndarray  # [B, ceil(S / block_size)], blocks past a table's end 0
    block_size: int
    first_chunk_lens: list[int] | None = None  # see `Paged`

    @property
    def num_seqs(self) -> int:
        return self.key_slots.shape[0]

    @property
    def max_query_len(self) -> int:
        return self.attend_bias.shape[1]

    @classmethod
    def build(cls, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
              block_size: int) -> "PagedArrays":
        """As `Paged.build`. In numpy: for the few sequences of a decode step, each of these small operations costs
        a fraction of a torch call (70-120 µs a pass in torch, on every step and MTP pass)."""
        # B sequences, Q query rows, S context positions, N blocks of context
        Q, S = max(query_lens), max(context_lens)
        N = -(-S // block_size)
        ql = np.asarray(query_lens, dtype=np.int64)
        cl = np.asarray(context_lens, dtype=np.int64)
        starts = np.cumsum(ql) - ql
        q_off = np.arange(Q)
        query_mask = q_off[None, :] < ql[:, None]
        q_pos = (cl - ql)[:, None] + q_off[None, :]  # [B, Q]
        positions = q_pos[query_mask]
        tables = np.zeros((len(block_tables), max(len(t) for t in block_tables)), dtype=np.int64)
        for row, table in zip(tables, block_tables):
            row[:len(table)] = table
        k_off = np.arange(S)
        key_valid = k_off[None, :] < cl[:, None]
        # every slot of the first N blocks, then the first S: a broadcast, where a gather by position cost more
        key_slots = (tables[:, :N, None] * block_size + np.arange(block_size)).reshape(len(tables), -1)[:, :S]
        key_slots = np.where(key_valid, key_slots, 0)
        slot_mapping = np.take_along_axis(key_slots, np.minimum(q_pos, S - 1), 1)[query_mask]
        attend = (k_off[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :] & query_mask[:, :, None]
        attend_bias = np.where(attend, np.float32(0), np.float32(Paged.MASKED))[:, :, None]
        if ql.min() == Q:
            query_index = query_rows = None
        else:
            query_index = np.where(query_mask, starts[:, None] + q_off[None, :], 0)
            query_rows = np.flatnonzero(query_mask)
        first_chunk_lens = list(query_lens) if list(query_lens) == list(context_lens) else None
        return cls(positions, slot_mapping, query_index, query_rows, key_slots, attend_bias, tables[:, :N], block_size,
                   first_chunk_lens)


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


AttentionMetadata = DenseCausal | Paged
