"""Decode steps run from graphs built once per shape: CUDA graphs on a GPU, compiled forwards on the CPU.

A decode step of a small batch runs hundreds of small operations, and their per-call costs, not their work, set
its time: kernel launches on a GPU, dispatch and Python on a CPU. A CUDA graph records a step's kernels once and
replays them with one launch; on the CPU, AOTInductor compiles the step ahead of time into a library of fused C++
kernels around the BLAS calls, called with no Python in between (`tandem.engine.aot_passes`; a forward of the
bundled model at batch 1 takes 0.97 ms there on a 2-core Xeon, 1.47 ms torch.compile'd, 3.9 ms eager). Both fix
every shape, so a step is padded to a bucket: the batch to the next of `batch_buckets`, the context to the next
multiple of `CONTEXT_STEP` positions (of whole cache blocks). A step's inputs are its tokens, their positions and
cache slots, and each sequence's block table: the graph derives the key slots and attention bias from those
(`Paged.from_block_tables`), so the host builds and copies no [batch, context] arrays. On the CPU attention
reads the keys by block itself, in a C++ kernel over each query's own positions (`tandem.kernels.mla_decode`,
which the engine builds; where it could not, the graph gathers the keys). Padding tokens write their latent
to a scratch slot the cache reserves for them; their outputs are discarded; keys past a query's position are
masked.

A graph serves one pass: the main model's, or one MTP module's (`mtp_module`), whose passes catch the module up
on the tokens just verified and draft. It serves steps of a few new tokens per sequence (`max_query_len`): one,
or one plus drafts; sequences bringing fewer tokens than the step's most are padded with tokens that attend to
nothing. The main model's pass also runs the output head, except in CUDA graphs (`with_logits`). Prompt chunks
run eagerly, and so does sampling. A CUDA graph is captured the first time its shape is met, which takes a
moment. A CPU compile takes 15-60 s on 2 cores, so compiled graphs are built before serving
(`warm_up`); their dims are dynamic, so a few libraries serve every shape, and they are cached on disk. Graphs
need a forward with no host sync and local experts (`DecodeGraphs.supports`); remote experts exchange on the
host. The kind "eager" runs the same padded static-buffer forward eagerly: tests run it on the CPU to check the
padding.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tandem.engine.aot_passes import AOTPasses, FlatPass
from tandem.engine.kv_cache import PagedKVCache
from tandem.model.attention_metadata import PagedStep
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM, MoE
from tandem.moe.experts import LocalExperts, grouped_mm_available

log = logging.getLogger(__name__)

CONTEXT_STEP = 256  # context positions are padded to a multiple of this
MAX_GRAPHS = 256  # shapes beyond this many run eagerly
KINDS = ("cuda", "compiled", "eager")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to and including `max_batch`."""
    return sorted({b for b in [1, 2, 4, *range(8, max_batch, 8)] if b < max_batch} | {max_batch})


class DecodeGraphs:
    """Runs decode steps of one pass of `model` (the main model, or MTP module `mtp_module`) from graphs built per
    (batch bucket, query length, context bucket), of one kind: "cuda" (CUDA graphs, captured when first needed),
    "compiled" (AOTInductor libraries with dynamic dims, built by `warm_up`) or "eager"."""

    def __init__(self, model: DeepseekV3ForCausalLM, cache: PagedKVCache, max_batch: int, max_context: int,
                 max_query_len: int, kind: str = "cuda", mtp_module: int | None = None,
                 scratch_slot: int | None = None):
        """max_query_len: new tokens per sequence at most (for the main model 1 + the drafts a step may verify);
        more are a prompt chunk, which runs eagerly (a graph per prompt length would be built for one use).
        scratch_slot: where padding tokens write their latents, shared by the graphs of one engine; by default a
        block of the cache is reserved for it."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.model = model
        self.cache = cache
        self.kind = kind
        self.mtp_module = mtp_module
        # the pass graphed, on a step's static inputs; the main model's with its output head, except in CUDA graphs:
        # each keeps its own output buffers, and [B*Q, vocab] logits per bucket add up to gigabytes there
        self.with_logits = mtp_module is None and kind != "cuda"
        self._pass = FlatPass(model, cache.block_size, mtp_module, self.with_logits)
        self.buckets = batch_buckets(max_batch)
        self.max_query_len = max_query_len
        self.context_step = math.lcm(CONTEXT_STEP, cache.block_size)  # whole blocks
        self.max_context = -(-max_context // self.context_step) * self.context_step
        self.scratch_slot = scratch_slot if scratch_slot is not None \
            else cache.allocator.allocate(1)[0] * cache.block_size
        self.pool = torch.cuda.graph_pool_handle() if kind == "cuda" else None
        self.num_replays = 0
        self.failed = False  # building a graph failed: no more are tried
        self._graphs: dict[tuple[int, int, int], _StepGraph] = {}
        # compiled: libraries built ahead of time by AOTInductor, one per shape class
        self._aot = AOTPasses(self._pass, self.buckets[-1], self.max_context, self.context_step) \
            if kind == "compiled" else None

    @staticmethod
    def supports(model: DeepseekV3ForCausalLM, kind: str = "cuda") -> bool:
        """Whether a decode pass of `model` can run from a graph of this kind: every MoE layer's experts local
        (remote ones exchange on the host) and observed by no one; for CUDA graphs also run by grouped matmuls,
        which sync with nothing (CUDA, bfloat16, compute capability 8.0 on)."""
        device = model.lm_head.weight.device
        if kind == "cuda" and not grouped_mm_available(device, model.lm_head.weight.dtype):
            return False
        return all(isinstance(layer.mlp.experts, LocalExperts) and layer.mlp.route_observer is None
                   for layer in model.model.layers if isinstance(layer.mlp, MoE))

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def run(self, input_ids: list[int], step: PagedStep, prev_hidden: torch.Tensor | None = None) \
            -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The pass's hidden states [T, D] for a step (an MTP module reads `prev_hidden` [T, D]) and, where the
        graph ran the output head (`with_logits`), the logits [T, V]; or None when it has no graph (a prompt
        chunk, beyond the largest bucket, or building its graph failed): the caller then runs it eagerly."""
        if step.max_query_len > self.max_query_len:
            return None
        num_seqs, query_len, context = step.num_seqs, step.max_query_len, step.max_context_len
        batch = next((b for b in self.buckets if b >= num_seqs), None)
        if batch is None or context > self.max_context:
            return None
        graph = self._graph(batch, query_len, -(-context // self.context_step) * self.context_step)
        if graph is None:
            return None
        rows = graph.load(input_ids, step, prev_hidden)
        self.num_replays += 1
        hidden, logits = graph.replay() if self.with_logits else (graph.replay(), None)
        if rows is None:
            real = num_seqs * query_len
            hidden = hidden[:real]
            # a CUDA graph's output is static, and the next replay overwrites it; compiled and eager passes return
            # new tensors, as they do logits
            return hidden.clone() if self.kind == "cuda" else hidden, None if logits is None else logits[:real]
        rows = rows.to(hidden.device)
        return hidden.index_select(0, rows), None if logits is None else logits.index_select(0, rows)

    def warm_up(self) -> None:
        """Build the graph of every batch bucket and query length now, at the first context bucket, so that no
        step waits for one later. Meant for compiled steps: their dims other than 1 are dynamic, so these shapes
        fall into a few classes (`aot_passes.shape_classes`: per token count, one sequence or more, few tokens or
        many for the experts), each compiled once, 15-30 s on 2 cores, and other contexts reuse them."""
        shapes = [(b, q) for b in self.buckets for q in range(1, self.max_query_len + 1)]
        started = time.perf_counter()
        log.info("building %s graphs of %s steps for %d shapes before serving", self.kind, self.pass_name,
                 len(shapes))
        for batch, query_len in shapes:
            if self._graph(batch, query_len, self.context_step) is None:
                return  # building failed (logged; steps run eagerly) or MAX_GRAPHS shapes are built
        log.info("%s graphs of %s steps ready in %.1f s", self.kind, self.pass_name, time.perf_counter() - started)

    def _graph(self, batch: int, query_len: int, context: int) -> "_StepGraph | None":
        """The graph of a shape, built when first asked for; None once building one failed."""
        key = (batch, query_len, context)
        graph = self._graphs.get(key)
        if graph is None:
            if self.failed or len(self._graphs) >= MAX_GRAPHS:
                return None
            try:
                graph = self._build(*key)
            except RuntimeError as e:  # a kernel that cannot be captured or compiled: serve on, eagerly
                log.warning("building a %s decode graph failed, decode steps run eagerly from now on: %s",
                            self.kind, e)
                self.failed = True
                return None
            self._graphs[key] = graph
        return graph

    def _build(self, batch: int, query_len: int, context: int) -> "_StepGraph":
        hidden_size = self.model.config.hidden_size if self.mtp_module is not None else None
        step = _StepGraph(self.cache, batch, query_len, context, self.scratch_slot, hidden_size)

        def forward() -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            return self._pass(*step.inputs)

        if self.kind == "eager":
            step.replay = forward
            return step
        if self.kind == "compiled":
            started = time.perf_counter()
            runner = self._aot.runner(batch, query_len, lambda context: _StepGraph(
                self.cache, batch, query_len, context, self.scratch_slot, hidden_size).inputs)
            step.replay = runner.bind(step.inputs)
            step.replay()  # fails now, not on a served step, should the library not run (padding only)
            log.info("%s steps of %d sequences x %d tokens over %d positions run compiled (%.1f s, %d shapes)",
                     self.pass_name, batch, query_len, context, time.perf_counter() - started,
                     len(self._graphs) + 1)
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
        log.info("captured a CUDA graph for %s steps of %d sequences x %d tokens over %d positions "
                 "(%d graphs)", self.pass_name, batch, query_len, context, len(self._graphs) + 1)
        return step

    @property
    def pass_name(self) -> str:
        return "decode" if self.mtp_module is None else f"MTP module {self.mtp_module}"


class _StepGraph:
    """The static inputs of one graphed shape: B sequences padded to `batch`, Q tokens each, the first
    context / block_size blocks of each sequence's cache, and for an MTP module the previous module's hidden
    states (`hidden_size` wide)."""

    def __init__(self, cache: PagedKVCache, batch: int, query_len: int, context: int, scratch_slot: int,
                 hidden_size: int | None = None):
        device = cache.tensor.device
        num_tokens = batch * query_len
        self.batch, self.query_len, self.scratch_slot = batch, query_len, scratch_slot
        self.block_size = cache.block_size
        self.input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((num_tokens,), scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(batch, context // cache.block_size, dtype=torch.int64, device=device)
        # one view per layer: a compiled forward writes a latent into it in place, where a write into a slice of
        # the one stacked cache tensor made it copy the whole cache on every step
        self.kv_layers = list(cache.tensor.unbind(0))
        self.prev_hidden = None if hidden_size is None else \
            torch.zeros(num_tokens, hidden_size, dtype=cache.tensor.dtype, device=device)
        self.replay: Callable[[], Any] = lambda: torch.empty(0)  # the graphed pass's outputs
        # where `load` writes the integer inputs: on the CPU the static inputs themselves, else host copies that
        # it copies in (`_uploads`); as numpy views, positions and slots as the [batch, Q] grid
        statics = (self.input_ids, self.positions, self.slot_mapping, self.block_tables)
        host = [t if t.device.type == "cpu" else torch.zeros_like(t, device="cpu") for t in statics]
        self._uploads = [(static, h) for static, h in zip(statics, host) if static is not h]
        ids, positions, slots, tables = (h.numpy() for h in host)
        self._arrays = ids, positions.reshape(batch, query_len), slots.reshape(batch, query_len), tables
        self._offsets = np.arange(query_len)

    @property
    def inputs(self) -> tuple[Any, ...]:
        """The graphed pass's arguments, as `FlatPass` takes them."""
        inputs = (self.input_ids, self.positions, self.slot_mapping, self.block_tables, self.kv_layers)
        return inputs if self.prev_hidden is None else (*inputs, self.prev_hidden)

    def load(self, input_ids: list[int], step: PagedStep, prev_hidden: torch.Tensor | None = None) \
            -> torch.Tensor | None:
        """Copy a step into the static inputs, padded: a sequence's tokens fill the first rows of its Q, extra
        tokens (of a shorter sequence, or a padding sequence) are id 0 at position 0 writing to the scratch slot.
        Returns the rows of the step's tokens in the [batch*Q] grid, or None when they are its first rows."""
        ids, positions, slots, tables = self._arrays
        num_seqs, width = step.num_seqs, tables.shape[1]
        # each table's first `width` blocks, zero-padded, in one assignment (a row at a time cost twice as much)
        padding = [0] * width
        tables[:num_seqs] = [(table + padding)[:width] for table in step.block_tables]
        tables[num_seqs:] = 0
        query_lens = np.asarray(step.query_lens, dtype=np.int64)
        offsets = self._offsets
        real = offsets < query_lens[:, None]  # [B, Q]
        pos = np.where(real, (np.asarray(step.context_lens, dtype=np.int64) - query_lens)[:, None] + offsets, 0)
        positions.fill(0)
        positions[:num_seqs] = pos
        slots.fill(self.scratch_slot)
        blocks = tables[np.arange(num_seqs)[:, None], pos // self.block_size]  # [B, Q]
        slots[:num_seqs] = np.where(real, blocks * self.block_size + pos % self.block_size, self.scratch_slot)
        rows = None if real.all() else torch.from_numpy(np.flatnonzero(real))
        ids.fill(0)
        ids[slice(0, len(input_ids)) if rows is None else rows.numpy()] = input_ids
        for static, host in self._uploads:
            static.copy_(host)
        if self.prev_hidden is not None:
            if rows is None:
                self.prev_hidden[:len(input_ids)].copy_(prev_hidden)
            else:
                self.prev_hidden.index_copy_(0, rows.to(prev_hidden.device), prev_hidden)
        return rows
