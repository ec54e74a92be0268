"""The training corpus: the Python standard library's own source, split by file.

Every machine with Python has it, so anyone can rebuild the bundled model. Whole top-level packages and
modules in `HELD_OUT` are kept for evaluation and never trained on (nor seen by the tokenizer), so held-out
loss and MTP acceptance measure code the model has not memorised. Tests, test data and generated tables
are left out of both sides (`SKIPPED_DIRS`, `SKIPPED_FILES`).

Files are tokenised into one stream per side with <|eos|> after every file; training draws fixed-length
windows from it at offsets that depend only on (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

# Top-level stdlib names held out for evaluation: a mix of library styles (CLI, text, parsing, numerics,
# a test framework, a large package) amounting to about a tenth of the corpus's bytes.
HELD_OUT = ("argparse", "difflib", "email", "json", "statistics", "tomllib", "unittest")
# Directories anywhere under the stdlib that are not library source (or are mostly tables and data).
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "idlelib", "turtledemo", "encodings",
                          "pydoc_data", "ensurepip", "lib-dynload", "__pycache__", "__phello__"})
SKIPPED_FILES = frozenset({"this.py"})  # rot13 text, not Python as anyone writes it


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True, slots=True)
class CorpusSplit:
    """Sorted source files of each side; `root` is the stdlib directory they are under."""

    root: Path
    train: tuple[Path, ...]
    heldout: tuple[Path, ...]

    def limited(self, max_files: int | None) -> "CorpusSplit":
        """The first `max_files` files of each side (tests and smoke runs)."""
        if max_files is None:
            return self
        return CorpusSplit(self.root, self.train[:max_files], self.heldout[:max_files])


def _is_skipped_dir(name: str) -> bool:
    return name in SKIPPED_DIRS or name.startswith("config-")


def _source_files(root: Path) -> list[Path]:
    """Paths relative to root of the library's .py files, sorted; skipped directories are never entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_skipped_dir(d)]
        rel_dir = Path(dirpath).relative_to(root)
        found += [rel_dir / f for f in filenames if f.endswith(".py") and f not in SKIPPED_FILES]
    return sorted(found)


def _top_level_name(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def split_corpus(root: str | Path | None = None, held_out: tuple[str, ...] = HELD_OUT) -> CorpusSplit:
    """Split the stdlib's source files into train and held-out sides by top-level package or module name."""
    root = Path(root) if root is not None else stdlib_root()
    train, heldout = [], []
    for rel in _source_files(root):
        (heldout if _top_level_name(rel) in held_out else train).append(root / rel)
    return CorpusSplit(root, tuple(train), tuple(heldout))


def read_source(path: Path) -> str:
    """A source file's text; newlines are kept as stored so decoding gives back the exact bytes."""
    return path.read_bytes().decode("utf-8")


def encode_files(tokenizer: Tokenizer, files: tuple[Path, ...] | list[Path]) -> torch.Tensor:
    """One stream [N] int64 of the files' tokens, each file followed by <|eos|>."""
    eos = tokenizer.token_to_id("<|eos|>")
    encodings = tokenizer.encode_batch([read_source(f) for f in files], add_special_tokens=False)
    ids: list[int] = []
    for enc in encodings:
        ids += enc.ids
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def batch_offsets(stream_len: int, window: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Start offsets [batch_size] of the training windows of one step; a function of (seed, step) only."""
    if stream_len < window:
        raise ValueError(f"the training stream has {stream_len} tokens, fewer than one window of {window}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, stream_len - window + 1, (batch_size,), generator=generator)


def training_batch(stream: torch.Tensor, window: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Windows [batch_size, window] of the training stream for `step`."""
    offsets = batch_offsets(len(stream), window, batch_size, seed, step)
    return torch.stack([stream[o:o + window] for o in offsets.tolist()])


def eval_windows(stream: torch.Tensor, window: int, num_windows: int) -> torch.Tensor:
    """`num_windows` windows [n, window] spread evenly over the held-out stream (fewer if it is short)."""
    available = len(stream) - window + 1
    if available <= 0:
        raise ValueError(f"the held-out stream has {len(stream)} tokens, fewer than one window of {window}")
    n = min(num_windows, available)
    starts = torch.linspace(0, available - 1, n).long()
    return torch.stack([stream[s:s + window] for s in starts.tolist()])
