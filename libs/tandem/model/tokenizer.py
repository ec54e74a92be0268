"""The tokenizer of a checkpoint directory (`tokenizer.json`, Hugging Face `tokenizers` format)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer | None:
    """The directory's tokenizer, or None when it has no tokenizer.json (then only token ids can be used)."""
    path = Path(model_dir) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.exists() else None
