"""The CPU kernels' shared library: every C++ source of this package built into one library with the compiler
AOTInductor uses (`load`; seconds, once per machine and torch version, then cached), whose operators implement the
`tandem::` schemas the kernel modules define (`mla_decode`, `layer_ops`, `ffn`, `linear`, `routing`, ...). Where it
cannot be built, the model keeps tensor operations."""

from __future__ import annotations

import fcntl
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

HERE = Path(__file__).parent
OPS = torch.library.Library("tandem", "DEF")  # the kernel modules define their operators' schemas in it

_loaded: bool | None = None  # None: not tried yet


def loaded() -> bool:
    """Whether the kernels are registered in this process (`load` succeeded)."""
    return bool(_loaded)


def load(build_dir: Path | None = None) -> bool:
    """Build the library into `build_dir` (by default `default_build_dir()`) unless a build of these sources, torch
    and CPU is there, and load it. False, with a warning saying why, where it cannot be built or loaded; tried once
    per process."""
    global _loaded
    if _loaded is None:
        try:
            torch.ops.load_library(str(_build(build_dir or default_build_dir())))
            _loaded = True
        except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
            detail = (getattr(error, "stderr", None) or str(error)).strip()
            log.warning("the CPU kernels could not be built (%s); the model runs as tensor operations",
                        detail.splitlines()[-1] if detail else type(error).__name__)
            _loaded = False
    return _loaded


def runs_on(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the library's kernels can run an operation on x and `tensors` (its weights, its other inputs): loaded,
    x on the CPU, and no gradient wanted of any of them (the kernels have no backward)."""
    return loaded() and x.device.type == "cpu" \
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors)))


def default_build_dir() -> Path:
    """`kernels` beside the compiled decode passes (`tandem.engine.aot_passes.writable_cache_dir`)."""
    from tandem.engine.aot_passes import writable_cache_dir  # it imports the model, which imports the kernels

    return writable_cache_dir() / "kernels"


def _build(build_dir: Path) -> Path:
    """The shared library, compiled for this machine (-march=native) against this torch."""
    path = library_path(build_dir)
    if path.exists():
        return path
    build_dir.mkdir(parents=True, exist_ok=True)
    # one build at a time per directory: a cluster's processes starting together on a fresh machine wait for the
    # first one's build instead of each compiling its own on the same cores
    with open(build_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            _compile(path)
    return path


def library_path(build_dir: Path) -> Path:
    """Where the build of these sources, torch, compiler, flags and CPU lies in `build_dir`."""
    texts = [p.read_text() for p in sorted(HERE.glob("*.h")) + _sources()]
    key = hashlib.sha256("\n".join([*texts, torch.__version__, _compiler(), *_flags(), _cpu_features(),
                                    sys.platform]).encode()).hexdigest()[:16]
    return build_dir / f"tandem-kernels-{key}.so"


def _sources() -> list[Path]:
    return sorted(HERE.glob("*.cpp"))


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def _flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]


def _compile(path: Path) -> None:
    """Build the library at `path`: each source compiled at once, by a process of its own (torch's headers make
    each take seconds), then linked, in a temporary directory beside it."""
    from torch.utils.cpp_extension import include_paths, library_paths

    compiler, flags, lib_dirs = _compiler(), _flags(), library_paths()
    log.info("building the CPU kernels (once per machine and torch version)")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        objects = [Path(tmp) / f"{source.stem}.o" for source in _sources()]
        _run_all([[compiler, *flags, "-c", *(f"-I{p}" for p in include_paths()), str(source), "-o", str(obj)]
                  for source, obj in zip(_sources(), objects)])
        staged = Path(tmp) / path.name
        _run_all([[compiler, *flags, *map(str, objects), "-o", str(staged), *(f"-L{p}" for p in lib_dirs), "-lc10",
                   "-ltorch_cpu", *(f"-Wl,-rpath,{p}" for p in lib_dirs)]])
        os.replace(staged, path)  # whole, or not at all, for another process reading the directory


def _run_all(commands: list[list[str]]) -> None:
    """Run the commands side by side; CalledProcessError (with the compiler's messages) for the first that fails."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = [p.communicate() for p in processes]
    for command, process, (stdout, stderr) in zip(commands, processes, outputs):
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command, stdout, stderr)


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
