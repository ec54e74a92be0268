"""Decode passes compiled ahead of time by AOTInductor: what a compiled CPU decode step runs.

`torch.compile` turns a decode step into fused C++ kernels around the BLAS calls, but every call of a compiled
function still passes through Dynamo: guards over the model's parameters and the step's inputs, the AOT autograd
wrappers, and symbolic sizes turned into tensors. On a 2-core Xeon that was a third of a compiled forward at
batch 1 (1.47 ms against 0.97 ms compiled ahead of time) and an eighth at batch 32. AOTInductor compiles the
same graph, from `torch.export`, into a shared library whose C++ runner calls the kernels directly; the library
reads the weights from the model's own tensors (they are not copied into it), and its dims are bound by export's
ranges instead of guards.

One library serves a shape class (`ShapeClass`): a pass, a query length, a range of batch sizes over which the
pass takes the same branches, and every context that is a multiple of `context_step`. The bounds of those ranges
do not depend on the engine, and libraries are cached on disk by everything they were built from, so another engine
of the same model (a restart, the CLI beside a server) starts at once.

A bfloat16 model on a CPU with AMX is the exception to reading the weights in place (`packs_weights`): there
oneDNN's matmuls cost about 40 us a call whatever their size, a decode step makes a few dozen small ones, and
Inductor's own AMX GEMM kernels, chosen per matmul by measuring them at build time, need their weights packed
into AMX tiles ahead of time. Those libraries hold packed copies of the matrices they multiply by (the weights'
digest is part of their cache key; a weight changed in place does not reach them) and take 3x longer to build.
Decode steps of the bundled model with them against without, in one process, alternating, on a 2-core Xeon
(Sapphire Rapids): 1.38 against 2.82 ms at batch 1, 3.59 against 5.30 ms at batch 8, 4.47 against 5.62 ms at
batch 32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from tandem.model.attention_metadata import Paged
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM, MoE

log = logging.getLogger(__name__)

CACHE_ENV = "TANDEM_AOT_CACHE"
# the bounds of a library's dynamic dims, however few sequences or positions the engine building it serves, so
# that engines of one model (a server, the CLI, a restart with other limits) share libraries
MAX_BATCH = 1024
MAX_CONTEXT_STEPS = 64


class FlatPass(nn.Module):
    """A decode pass of the main model, or of MTP module `mtp_module`, taking tensors only, as torch.export wants
    (every kind of decode graph runs it on a step's static inputs): (input_ids [B*Q], positions [B*Q],
    slot_mapping [B*Q], block_tables [B, N] of the cache's `block_size`-slot blocks, kv cache layers[,
    prev_hidden [B*Q, D]]) -> hidden [B*Q, D], or with `with_logits` (the main model's pass) (hidden, logits
    [B*Q, V] float32): the output head then runs in the graph too. The key slots and attention bias over the
    N * block_size positions are derived in the graph (`Paged.from_block_tables`)."""

    def __init__(self, model: DeepseekV3ForCausalLM, block_size: int, mtp_module: int | None = None,
                 with_logits: bool = False):
        super().__init__()
        if with_logits and mtp_module is not None:
            raise ValueError("with_logits is for the main model's pass")
        self.model = model
        self.block_size = block_size
        self.mtp_module = mtp_module
        self.with_logits = with_logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, kv_layers: list[torch.Tensor],
                prev_hidden: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        meta = Paged.from_block_tables(positions, slot_mapping, block_tables, self.block_size, list(kv_layers))
        if self.mtp_module is not None:
            return self.model.mtp_forward(self.mtp_module, input_ids, prev_hidden, meta)
        hidden = self.model(input_ids, meta)
        return (hidden, self.model.logits(hidden)) if self.with_logits else hidden


@dataclass(frozen=True)
class ShapeClass:
    """Steps of `query_len` tokens per sequence whose batch lies in [min_batch, max_batch]."""

    query_len: int
    min_batch: int
    max_batch: int


def shape_classes(model: DeepseekV3ForCausalLM, max_batch: int, query_len: int) -> list[ShapeClass]:
    """The batch ranges one library can serve: batch 1 on its own (export specialises dims of size 1), then
    ranges split where a MoE layer's experts change how they run the step's tokens
    (`ExpertBank.max_gathered_tokens`; never where the CPU kernel runs them)."""
    top_k = model.config.num_experts_per_tok
    token_limits = {layer.mlp.experts.bank.max_gathered_tokens(top_k)
                    for layer in [*model.main_layers, *model.mtp_layers] if isinstance(layer.mlp, MoE)}
    cuts = sorted({limit // query_len for limit in token_limits - {None} if 2 <= limit // query_len < max_batch})
    starts = [1, 2, *(c + 1 for c in cuts)]
    ends = [1, *cuts, max_batch]
    return [ShapeClass(query_len, lo, hi) for lo, hi in zip(starts, ends) if lo <= hi]


def cache_dir() -> Path:
    """Where built libraries are kept: $TANDEM_AOT_CACHE, by default beside torch's own compile cache."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    return Path(os.environ.get(CACHE_ENV) or Path(inductor_cache_dir()) / "tandem-aot")


def writable_cache_dir() -> Path:
    """`cache_dir()`, or where it cannot be written (a read-only home, say), a directory of this process's own."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    own = Path(tempfile.mkdtemp(prefix="tandem-aot-"))
    log.warning("cannot write compiled passes to %s (set %s to a writable directory); this process keeps them in "
                "%s", path, CACHE_ENV, own)
    return own


def packs_weights(dtype: torch.dtype) -> bool:
    """Whether libraries for weights of `dtype` run Inductor's GEMM kernels on weights packed at build time:
    bfloat16 on a CPU with AMX tiles (in float32 they were slower than MKL's matmuls)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return dtype == torch.bfloat16 and amx()


class AOTPasses:
    """Builds, caches and loads the library of each shape class of one pass, on first use."""

    def __init__(self, flat: FlatPass, max_batch: int, max_context: int, context_step: int):
        self.flat = flat
        self.packs_weights = packs_weights(flat.model.lm_head.weight.dtype)
        self._digest: str | None = None  # of the weights, computed when first needed
        self.max_batch = max(max_batch, MAX_BATCH)
        self.max_blocks = max(-(-max_context // context_step), MAX_CONTEXT_STEPS)
        self.context_step = context_step
        self.num_built = 0  # libraries compiled by this process (the others came from the cache)
        self._dir: Path | None = None  # the cache directory, found when first needed
        self._runners: dict[ShapeClass, Library] = {}

    def shape_class(self, batch: int, query_len: int) -> ShapeClass:
        classes = shape_classes(self.flat.model, self.max_batch, query_len)
        return next(c for c in classes if c.min_batch <= batch <= c.max_batch)

    def runner(self, batch: int, query_len: int, example: Callable[[int], tuple]) -> "Library":
        """The compiled pass serving steps of `batch` sequences x `query_len` tokens. example(context) gives the
        pass's inputs for such a step over `context` positions; export only reads their shapes and strides."""
        shape = self.shape_class(batch, query_len)
        runner = self._runners.get(shape)
        if runner is None:
            runner = self._runners[shape] = self._load(shape, example)
        return runner

    def _dynamic_shapes(self, shape: ShapeClass, inputs: tuple) -> tuple:
        """Export's dims, in `FlatPass`'s argument order: the batch where the class has more than one size, the
        context in whole steps (as blocks of the cache), and the cache's slots."""
        b = Dim(f"batch_from_{shape.min_batch}", min=shape.min_batch, max=shape.max_batch) \
            if shape.max_batch > shape.min_batch else None
        blocks = self.context_step // self.flat.block_size * Dim("context_steps", min=1, max=self.max_blocks)
        slots = Dim("cache_slots", min=2)

        def dims(by_axis: dict) -> dict | None:
            return {axis: dim for axis, dim in by_axis.items() if dim is not None} or None

        tokens = dims({0: b if b is None or shape.query_len == 1 else shape.query_len * b})
        spec = [tokens, tokens, tokens, dims({0: b, 1: blocks}), [{0: slots}] * len(inputs[4])]
        return tuple(spec + [tokens] * (len(inputs) - len(spec)))  # prev_hidden, for an MTP pass

    def _load(self, shape: ShapeClass, example: Callable[[int], tuple]) -> "Library":
        started = time.perf_counter()
        # the context is exported from two steps' worth: export specialises a dim whose example is 1
        inputs = example(2 * self.context_step)
        dynamic_shapes = self._dynamic_shapes(shape, inputs)
        with torch.inference_mode(False), torch.no_grad():
            program = torch.export.export(self.flat, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        constants = {**dict(self.flat.named_parameters(remove_duplicate=False)),
                     **dict(self.flat.named_buffers(remove_duplicate=False))}
        configs = {"aot_inductor.package_constants_in_so": False}
        if self.packs_weights:  # the packed weights are constants of the library's own
            configs = {"aot_inductor.package_constants_in_so": True, "max_autotune": True,
                       "max_autotune_gemm_backends": "CPP,ATEN"}
        self._dir = self._dir or writable_cache_dir()
        path = self._dir / f"{self._key(program, configs, self._weights_digest())}.pt2"
        built = not path.exists()
        if built:
            with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
                staged = torch._inductor.aoti_compile_and_package(  # no timings per matmul on stderr
                    program, package_path=str(Path(tmp) / path.name), inductor_configs={
                        **configs, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False})
                os.replace(staged, path)  # whole, or not at all, for another process reading the cache
            self.num_built += 1
        runner = torch._inductor.aoti_load_package(str(path))
        # user-managed: the library reads the parameters in place, no copy of the weights (but the packed ones)
        names = runner.get_constant_fqns()
        if self.packs_weights:
            names = [name for name in names if name in constants]
        runner.load_constants({name: constants[name] for name in names},
                              check_full_update=not self.packs_weights, user_managed=True)
        log.info("%s for %d-%d sequences x %d tokens %s in %.1f s", self._name, shape.min_batch, shape.max_batch,
                 shape.query_len, "compiled ahead of time" if built else "loaded from the cache",
                 time.perf_counter() - started)
        return Library(runner)

    @property
    def _name(self) -> str:
        m = self.flat.mtp_module
        return "decode pass" if m is None else f"MTP module {m}'s pass"

    def _weights_digest(self) -> str:
        """The weights' values, where the library holds packed copies of them; else nothing (it reads them)."""
        if not self.packs_weights:
            return ""
        if self._digest is None:
            digest = hashlib.sha256()
            for name, tensor in self.flat.state_dict(keep_vars=True).items():
                digest.update(name.encode())
                digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
            self._digest = digest.hexdigest()
        return self._digest

    @staticmethod
    def _key(program: torch.export.ExportedProgram, configs: dict, weights_digest: str) -> str:
        """A digest of what the library is compiled from: the graph, its inputs' and weights' dtypes, shapes
        (symbolic where dynamic) and strides, the dims' ranges, the compiler's settings, torch and the CPU's ISA,
        and the weights' values where it packs them (`_weights_digest`)."""
        placeholders = [f"{node.name}:{v.dtype}{tuple(v.shape)}{v.stride()}" for node in program.graph.nodes
                        if node.op == "placeholder" and isinstance(v := node.meta.get("val"), torch.Tensor)]
        parts = [torch.__version__, torch.backends.cpu.get_cpu_capability(), program.graph_module.code,
                 str(program.range_constraints), *placeholders]
        if weights_digest:  # keys of libraries that read the weights in place stay as they were
            parts += [str(sorted(configs.items())), weights_digest]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class Library:
    """A loaded library of one shape class, run on the same input tensors every step (a graph's static inputs):
    `bind` flattens them once, and each call hands them to the runner as they are, where the package's own
    call flattened them and parsed its call spec again every time (about 50 us of a batch-32 step)."""

    def __init__(self, package: Callable[..., object]):
        self._loader = package.loader
        self._out_spec = pytree.treespec_loads(self._loader.get_call_spec()[1])

    def bind(self, inputs: tuple) -> Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]:
        """The pass over `inputs` (`FlatPass`'s arguments), as a call of no arguments."""
        flat = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        return lambda: pytree.tree_unflatten(self._loader.boxed_run(list(flat)), self._out_spec)
