"""The paged MLA KV cache.

Per token and layer it stores only what MLA needs: the compressed latent (`kv_lora_rank`) and the decoupled
rope key (`qk_rope_head_dim`), not per-head keys and values. Memory is cut into fixed-size blocks; each
sequence owns a block table, so sequences of any length share one pool without fragmentation. Main and MTP
layers share a sequence's block table.
"""

from __future__ import annotations

import torch

from tandem.model.config import ModelConfig


def _cache_rows(block_table: list[int] | torch.Tensor, num_tokens: int, block_size: int,
                device: torch.device) -> torch.Tensor:
    """[num_tokens] row of each position in a cache tensor cut into blocks of block_size rows."""
    table = torch.as_tensor(block_table, dtype=torch.int64, device=device)
    if table.numel() * block_size < num_tokens:
        raise ValueError(f"a block table of {table.numel()} blocks of {block_size} cannot hold {num_tokens} tokens")
    pos = torch.arange(num_tokens, device=device)
    return table[pos // block_size] * block_size + pos % block_size


def gather_kv(cache: torch.Tensor, block_table: list[int] | torch.Tensor, num_tokens: int,
              block_size: int) -> torch.Tensor:
    """A sequence's rows out of a paged cache tensor [L, num_blocks * block_size, C] -> [L, num_tokens, C]."""
    return cache[:, _cache_rows(block_table, num_tokens, block_size, cache.device)]


def scatter_kv(cache: torch.Tensor, block_table: list[int] | torch.Tensor, kv: torch.Tensor,
               block_size: int) -> None:
    """Write kv [L, N, C] into the first N positions of a sequence's blocks in cache [L, rows, C], in place."""
    cache[:, _cache_rows(block_table, kv.shape[1], block_size, cache.device)] = kv.to(cache.dtype)


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    """Free list of block ids; `can_allocate / allocate / free`."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfBlocks(f"asked for {n} KV blocks, {len(self._free)} free")
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - n:]
        return out[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class PagedKVCache:
    """One tensor [num_kv_layers, num_blocks * block_size, kv_lora_rank + qk_rope_head_dim] plus its allocator."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.tensor = torch.zeros(config.num_kv_layers, num_blocks * block_size, config.kv_cache_dim,
                                  dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.num_kv_layers * block_size * config.kv_cache_dim * dtype.itemsize

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ensure_capacity(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow `block_table` in place to hold `num_tokens` positions; False (and no change) if the pool is short."""
        missing = self.blocks_for(num_tokens) - len(block_table)
        if missing <= 0:
            return True
        if not self.allocator.can_allocate(missing):
            return False
        block_table.extend(self.allocator.allocate(missing))
        return True

    def shrink(self, block_table: list[int], num_tokens: int) -> None:
        """Release the blocks past the first `num_tokens` positions (rolled-back drafts)."""
        keep = self.blocks_for(num_tokens)
        if len(block_table) > keep:
            self.allocator.free(block_table[keep:])
            del block_table[keep:]

    def release(self, block_table: list[int]) -> None:
        self.allocator.free(block_table)
        block_table.clear()

    def read(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A sequence's first num_tokens positions, every layer: [num_kv_layers, num_tokens, kv_dim]."""
        return gather_kv(self.tensor, block_table, num_tokens, self.block_size)

    def write(self, block_table: list[int], kv: torch.Tensor) -> None:
        scatter_kv(self.tensor, block_table, kv, self.block_size)
