"""Lazy, selective reading and writing of Hugging Face-layout checkpoints.

A server that hosts a few experts of a large MoE model must not read the rest of it, so `Checkpoint`
reads only headers up front and opens a shard the first time one of its tensors is asked for.
FP8 weights are stored as DeepSeek ships them: `float8_e4m3fn` plus a float32 `<name>_scale_inv`
holding one scale per block (128x128 by default); `load` dequantises them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tandem.model.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Linear layers DeepSeek stores in FP8; embeddings, heads, norms and the router stay in high precision.
FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
               "gate_proj", "up_proj", "down_proj", "eh_proj")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}


class CheckpointError(ValueError):
    """A checkpoint Tandem cannot read; the message always names the file and the tensor."""


class Checkpoint:
    """A Hugging Face checkpoint directory: config.json, model.safetensors or shards + model.safetensors.index.json,
    tokenizer.json.

    Construction reads the config and the index (or the single file's header), never tensor data.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = ModelConfig.from_file(self.path)
        self._handles: dict[str, object] = {}
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                self._where: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        elif (self.path / SINGLE_FILE).exists():
            self._where = dict.fromkeys(self._open(SINGLE_FILE, "<header>").keys(), SINGLE_FILE)
        else:
            raise CheckpointError(f"{self.path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")

    def names(self) -> list[str]:
        """Tensor names, sorted; the FP8 scale companions are left out because `load` applies them."""
        return sorted(n for n in self._where if not n.endswith(SCALE_SUFFIX))

    def has(self, name: str) -> bool:
        return name in self._where

    @property
    def shards_opened(self) -> set[str]:
        """File names of the shards opened so far (a single-file checkpoint is opened at construction)."""
        return set(self._handles)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, read from the shard's header."""
        return tuple(self._slice(name).get_shape())

    def tensor_dtype(self, name: str) -> torch.dtype:
        """The stored dtype (float8_e4m3fn for quantised weights), read from the shard's header."""
        stored = self._slice(name).get_dtype()
        if stored not in _DTYPES:
            raise CheckpointError(f"{self._file(name)}: tensor {name} is stored as {stored}; "
                                  f"Tandem reads only {', '.join(_DTYPES)}")
        return _DTYPES[stored]

    def load(self, name: str, *, shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (dequantising FP8), checking it has `shape` when given; opens only its shard."""
        found = self.tensor_shape(name)
        if shape is not None and found != tuple(shape):
            raise CheckpointError(f"{self._file(name)}: tensor {name} has shape {found}, expected {tuple(shape)}")
        stored = self.tensor_dtype(name)
        tensor = self._handle(name).get_tensor(name).to(device)
        if stored == torch.float8_e4m3fn:
            tensor = dequantize_fp8_blockwise(tensor, self._scale_for(name, found).to(device), self._block)
        return tensor.to(dtype)

    def load_many(self, names: Iterable[str], **kw) -> dict[str, torch.Tensor]:
        """`load` for each name, with the same keyword arguments."""
        return {name: self.load(name, **kw) for name in names}

    @property
    def _block(self) -> tuple[int, int]:
        return self.config.weight_block_size or DEFAULT_BLOCK

    def _scale_for(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        scale_name = name + SCALE_SUFFIX
        if len(shape) != 2:
            raise CheckpointError(f"{self._file(name)}: FP8 tensor {name} has shape {shape}; only 2-D weights "
                                  "can be block-quantised")
        if scale_name not in self._where:
            raise CheckpointError(f"{self._file(name)}: FP8 tensor {name} has no scale tensor {scale_name}")
        expected = tuple(math.ceil(n / b) for n, b in zip(shape, self._block))
        found = self.tensor_shape(scale_name)
        if found != expected:
            raise CheckpointError(f"{self._file(scale_name)}: scale tensor {scale_name} has shape {found}, expected "
                                  f"{expected} for {name} of shape {shape} in blocks of {self._block}")
        self.tensor_dtype(scale_name)  # rejects e.g. an integer scale with a clear message
        return self._handle(scale_name).get_tensor(scale_name).float()

    def _file(self, name: str) -> Path:
        if name not in self._where:
            raise CheckpointError(f"missing tensor {name} in {self.path} (index lists {len(self._where)} tensors)")
        return self.path / self._where[name]

    def _handle(self, name: str):
        self._file(name)  # raises for a missing tensor
        return self._open(self._where[name], name)

    def _slice(self, name: str):
        return self._handle(name).get_slice(name)

    def _open(self, shard: str, name: str):
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(self.path / shard, framework="pt")
            except (OSError, SafetensorError) as e:
                raise CheckpointError(f"{self.path / shard}: cannot open shard holding {name} ({e})") from e
        return self._handles[shard]


def dequantize_fp8_blockwise(weight: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """float32 weight [R, C] from FP8 `weight` [R, C] and `scale_inv` [ceil(R/b0), ceil(C/b1)]."""
    rows, cols = weight.shape
    scale = scale_inv.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.float() * scale


def quantize_fp8_blockwise(weight: torch.Tensor,
                           block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's block scheme: each b0 x b1 block is scaled so its largest magnitude maps to 448.

    Returns (float8_e4m3fn weight [R, C], float32 scale_inv [ceil(R/b0), ceil(C/b1)]); the weight is
    recovered as fp8.float() * scale_inv expanded to blocks.
    """
    if weight.dim() != 2:
        raise ValueError(f"block quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    (rows, cols), (b0, b1) = weight.shape, block
    padded = F.pad(weight.float(), (0, -cols % b1, 0, -rows % b0))  # zero padding leaves each block's amax alone
    blocks = padded.view(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    # an all-zero block gets a tiny scale instead of dividing by zero
    scale_inv = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view_as(padded)
    return scaled[:rows, :cols].to(torch.float8_e4m3fn).contiguous(), scale_inv


def save_checkpoint(path: str | Path, config: ModelConfig, tensors: dict[str, torch.Tensor], *,
                    max_shard_bytes: int | None = None, tokenizer_json: str | Path | None = None) -> None:
    """Write a Hugging Face checkpoint directory; shards (with an index) only when `max_shard_bytes` is exceeded.

    Refuses a directory that already holds weights, since a stale index or shard would shadow the new ones.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in path.glob("model*.safetensors*"))
    if stale:
        raise CheckpointError(f"{path}: already holds checkpoint files {stale}; write to an empty directory")
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name in tensors:
        if max_shard_bytes is not None and shards[-1] and shard_bytes + sizes[name] > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += sizes[name]
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    if len(shards) == 1:
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, path / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))


def is_fp8_linear(name: str, shape: tuple[int, ...]) -> bool:
    """Whether DeepSeek stores this tensor in FP8: the 2-D weight of a Linear inside a decoder (or MTP) layer."""
    parts = name.split(".")
    return "layers" in parts and len(shape) == 2 and parts[-1] == "weight" and parts[-2] in FP8_LINEARS


def quantize_checkpoint_fp8(src: str | Path, dst: str | Path, block: tuple[int, int] = DEFAULT_BLOCK,
                            matrix_dtype: torch.dtype | None = None) -> None:
    """Copy a bf16/fp32 checkpoint to an FP8 one laid out as DeepSeek ships it (holds the model in memory).

    `matrix_dtype` (e.g. bfloat16, as DeepSeek stores them) is the dtype of the matrices that stay unquantised:
    embeddings, output heads, router weights; None keeps the stored dtype. Vectors (norms, biases) are kept."""
    source = Checkpoint(src)
    out: dict[str, torch.Tensor] = {}
    for name in source.names():
        shape = source.tensor_shape(name)
        if is_fp8_linear(name, shape):
            out[name], out[name + SCALE_SUFFIX] = quantize_fp8_blockwise(source.load(name), block)
            continue
        stored = source.tensor_dtype(name)
        dtype = torch.float32 if stored == torch.float8_e4m3fn else stored
        if matrix_dtype is not None and len(shape) >= 2 and dtype.is_floating_point:
            dtype = matrix_dtype
        out[name] = source.load(name, dtype=dtype)
    tokenizer = source.path / "tokenizer.json"
    save_checkpoint(dst, dataclasses.replace(source.config, weight_block_size=tuple(block)), out,
                    tokenizer_json=tokenizer if tokenizer.exists() else None)
