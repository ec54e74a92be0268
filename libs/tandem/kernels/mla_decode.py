"""The CPU kernel of a decode step's weight-absorbed MLA attention over the paged cache.

Written as tensor operations, a compiled CPU decode step gathers every sequence's keys from the cache into a
[batch, context, kv_lora_rank + rope] float32 tensor, multiplies the queries by it and its latent part by the
probabilities in batched matmuls, and softmaxes [batch, heads, context] scores in between: at the bundled model's
batch-32 step on a 2-core Xeon the gather alone moved 4 MB per layer and took as long as the two matmuls. The kernel
(`mla_decode.cpp`) attends one query row at a time instead, from the blocks its block table names, over its own
positions (not the context padded to the graph's bucket), with every intermediate in the core's cache; it also
absorbs the queries into the latent and projects the result to each head's value (`kv_b_proj`), where the step
made two more batched matmuls.

It is C++ built with the compiler AOTInductor uses when a CPU engine of a model it fits starts (`load`; seconds,
then cached beside the compiled passes), and registered as the operator `torch.ops.tandem.mla_paged_decode`, which
eager steps call and `torch.export` traces into AOTInductor's libraries. Where it cannot be built, attention runs
as tensor operations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("mla_decode.cpp")
HEADS_MULTIPLE = 8  # the kernel scores 8 heads per vector
LATENT_MULTIPLE = 16  # and sums the latent 16 columns at a time

_loaded: bool | None = None  # None: not tried yet


def loaded() -> bool:
    """Whether the operator is registered in this process (`load` succeeded)."""
    return bool(_loaded)


def fits(num_heads: int, kv_lora_rank: int) -> bool:
    """Whether the kernel serves attention of these dims."""
    return num_heads % HEADS_MULTIPLE == 0 and kv_lora_rank % LATENT_MULTIPLE == 0


def supports(num_heads: int, kv_lora_rank: int) -> bool:
    """Whether the kernel is loaded and serves attention of these dims."""
    return loaded() and fits(num_heads, kv_lora_rank)


def load(build_dir: Path) -> bool:
    """Build the kernel into `build_dir` unless a build of this source, torch and CPU is there, and register its
    operator. False, with a warning saying why, where it cannot be built or loaded; tried once per process."""
    global _loaded
    if _loaded is None:
        try:
            torch.ops.load_library(str(_build(build_dir)))
            _register_fake()
            _loaded = True
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            log.warning("the CPU MLA decode kernel could not be built (%s); decode attention runs as tensor "
                        "operations", detail.strip().splitlines()[-1] if detail.strip() else type(error).__name__)
            _loaded = False
    return _loaded


def _build(build_dir: Path) -> Path:
    """The kernel's shared library, compiled for this machine (-march=native) against this torch."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = os.environ.get("CXX", "g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    key = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, compiler, *flags, _cpu_features(),
                                    sys.platform]).encode()).hexdigest()[:16]
    path = build_dir / f"mla_decode-{key}.so"
    if path.exists():
        return path
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_dirs = library_paths()
    with tempfile.TemporaryDirectory(dir=build_dir) as tmp:
        staged = Path(tmp) / path.name
        command = [compiler, *flags, *(f"-I{p}" for p in include_paths()), str(SOURCE), "-o", str(staged),
                   *(f"-L{p}" for p in lib_dirs), "-lc10", "-ltorch_cpu", *(f"-Wl,-rpath,{p}" for p in lib_dirs)]
        log.info("building the CPU MLA decode kernel (once per machine and torch version)")
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(staged, path)  # whole, or not at all, for another process reading the directory
    return path


def _cpu_features() -> str:
    """What -march=native compiles for: the CPU's feature flags, so that a build directory shared by machines of
    other CPUs (a volume mounted on several nodes) never hands one a library using instructions it lacks."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {torch.backends.cpu.get_cpu_capability()}"


def _register_fake() -> None:
    """The operator's output shape, for torch.export to trace it."""

    @torch.library.register_fake("tandem::mla_paged_decode")
    def _(q_nope, q_pe, w_kv, cache, block_tables, positions, block_size, scale):
        return q_nope.new_empty(*q_nope.shape[:3], w_kv.shape[1] - q_nope.shape[3])


def paged_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, w_kv: torch.Tensor, cache: torch.Tensor,
                 block_tables: torch.Tensor, positions: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """Each head's value [B, Q, H, V] float32 of weight-absorbed MLA attention: the no-rope queries q_nope
    [B, Q, H, N] and rope queries q_pe [B, Q, H, R] (float32), `kv_b_proj`'s weight per head w_kv [H, N + V, C] (W_UK
    then W_UV, in the cache's dtype), each query attending to the cached positions 0 to its own (`positions`
    [B*Q]) of its sequence (block_tables [B, num_blocks] of cache [slots, C + R], `block_size` slots per block),
    with softmax `scale`."""
    return torch.ops.tandem.mla_paged_decode(q_nope, q_pe, w_kv, cache, block_tables, positions, block_size, scale)
