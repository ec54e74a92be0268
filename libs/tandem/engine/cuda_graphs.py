"""Decode steps replayed from CUDA graphs.

A decode step of a small batch launches hundreds of small kernels, and on a GPU their launch costs, not their
work, set its time. A CUDA graph records a step's kernels once and replays them with one launch. A graph fixes
every shape, so a step is padded to a bucket: the batch to the next of `batch_buckets`, the context to the next
multiple of `CONTEXT_STEP` positions. Padding sequences attend to nothing and write their latent to a scratch
slot the cache reserves for them; padding keys are masked.

Only the main model's pass of a uniform decode step is graphed: every sequence brings the same number of new
tokens (one, or one plus the same number of drafts). Prefill chunks and mixed steps run eagerly, and so do
sampling and the MTP drafts. A graph is captured the first time its shape is met; all share one memory pool,
as they never run at once. Graphs need a forward with no host sync, which the model has on CUDA with bfloat16
grouped expert matmuls and local experts (`DecodeGraphs.supports`); remote experts exchange on the host.

With `capture=False` the same padded static-buffer forward runs eagerly: tests run it on the CPU to check the
padding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from tandem.engine.kv_cache import PagedKVCache
from tandem.model.attention_metadata import Paged, PagedArrays
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM, MoE
from tandem.moe.experts import LocalExperts, grouped_mm_available

log = logging.getLogger(__name__)

CONTEXT_STEP = 256  # context positions are padded to a multiple of this
MAX_GRAPHS = 256  # shapes beyond this many run eagerly


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to and including `max_batch`."""
    return sorted({b for b in [1, 2, 4, *range(8, max_batch, 8)] if b < max_batch} | {max_batch})


class DecodeGraphs:
    """Runs uniform decode steps of `model` from graphs captured per (batch bucket, query length, context bucket)."""

    def __init__(self, model: DeepseekV3ForCausalLM, cache: PagedKVCache, max_batch: int, max_context: int,
                 capture: bool = True):
        self.model = model
        self.cache = cache
        self.capture = capture
        self.buckets = batch_buckets(max_batch)
        self.max_context = -(-max_context // CONTEXT_STEP) * CONTEXT_STEP
        self.scratch_slot = cache.allocator.allocate(1)[0] * cache.block_size  # padding tokens write here
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.num_replays = 0
        self.failed = False  # a capture failed: no more are tried
        self._graphs: dict[tuple[int, int, int], _StepGraph] = {}

    @staticmethod
    def supports(model: DeepseekV3ForCausalLM) -> bool:
        """Whether a decode pass of `model` runs without a host sync: on CUDA, every MoE layer's experts local
        and run by grouped matmuls (bfloat16, compute capability 8.0 on)."""
        device = model.lm_head.weight.device
        if not grouped_mm_available(device, model.lm_head.weight.dtype):
            return False
        return all(isinstance(layer.mlp.experts, LocalExperts) and layer.mlp.route_observer is None
                   for layer in model.model.layers if isinstance(layer.mlp, MoE))

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(self, input_ids: list[int], arrays: PagedArrays) -> torch.Tensor | None:
        """The main model's hidden states [T, D] for a step, or None when it has no graph (not a uniform decode
        step, beyond the largest bucket, or capturing failed): the caller then runs it eagerly."""
        if arrays.query_index is not None:
            return None
        num_seqs, query_len, context = arrays.num_seqs, arrays.max_query_len, arrays.key_slots.shape[1]
        batch = next((b for b in self.buckets if b >= num_seqs), None)
        if batch is None or context > self.max_context:
            return None
        key = (batch, query_len, -(-context // CONTEXT_STEP) * CONTEXT_STEP)
        graph = self._graphs.get(key)
        if graph is None:
            if self.failed or len(self._graphs) >= MAX_GRAPHS:
                return None
            try:
                graph = self._capture(*key)
            except RuntimeError as e:  # a kernel that cannot be captured: serve on, eagerly
                log.warning("capturing a CUDA graph failed, decode steps run eagerly from now on: %s", e)
                self.failed = True
                return None
            self._graphs[key] = graph
        graph.load(input_ids, arrays)
        self.num_replays += 1
        return graph.replay()[: num_seqs * query_len].clone()

    def _capture(self, batch: int, query_len: int, context: int) -> "_StepGraph":
        step = _StepGraph(self.cache.tensor, batch, query_len, context, self.scratch_slot)

        def forward() -> torch.Tensor:
            return self.model(step.input_ids, step.meta)

        if not self.capture:
            step.replay = forward
            return step
        # warm-up outside the capture (lazy initialisations), on a side stream as capture requires
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        step.replay = replay
        log.info("captured a CUDA graph for decode steps of %d sequences x %d tokens over %d positions "
                 "(%d graphs)", batch, query_len, context, len(self._graphs) + 1)
        return step


class _StepGraph:
    """The static inputs of one graphed shape: B sequences padded to `batch`, Q tokens each, S key positions."""

    def __init__(self, kv_cache: torch.Tensor, batch: int, query_len: int, context: int, scratch_slot: int):
        device = kv_cache.device
        num_tokens = batch * query_len
        self.batch, self.query_len, self.context, self.scratch_slot = batch, query_len, context, scratch_slot
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        positions = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        slot_mapping = torch.full((num_tokens,), scratch_slot, dtype=torch.int64, device=device)
        key_slots = torch.zeros(batch * context, dtype=torch.int64, device=device)
        attend_bias = torch.full((batch, query_len, 1, context), Paged.MASKED, dtype=torch.float32, device=device)
        self.meta = Paged(positions, slot_mapping, None, None, key_slots, attend_bias, kv_cache, batch, query_len)
        self.replay: Callable[[], torch.Tensor] = lambda: torch.empty(0)

    def load(self, input_ids: list[int], arrays: PagedArrays) -> None:
        """Copy a step into the static inputs, padded: extra tokens are id 0 at position 0 writing to the scratch
        slot, extra keys are slot 0 and masked."""
        real = len(input_ids)
        num_seqs, context = arrays.num_seqs, arrays.key_slots.shape[1]
        ids = np.zeros(self.input_ids.shape[0], dtype=np.int64)
        ids[:real] = input_ids
        positions = np.zeros_like(ids)
        positions[:real] = arrays.positions
        slots = np.full_like(ids, self.scratch_slot)
        slots[:real] = arrays.slot_mapping
        keys = np.zeros((self.batch, self.context), dtype=np.int64)
        keys[:num_seqs, :context] = arrays.key_slots
        bias = np.full((self.batch, self.query_len, 1, self.context), Paged.MASKED, dtype=np.float32)
        bias[:num_seqs, :, :, :context] = arrays.attend_bias
        meta = self.meta
        for static, value in ((self.input_ids, ids), (meta.positions, positions), (meta.slot_mapping, slots),
                              (meta.key_slots, keys.reshape(-1)), (meta.attend_bias, bias)):
            static.copy_(torch.from_numpy(value))
