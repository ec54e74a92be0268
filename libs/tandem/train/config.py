"""Settings of one training run (`tandem train` flags map one to one onto `TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STAGES = ("main", "mtpd", "extend")
HEAD_TYPES = ("deepseek", "meta")
AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class TrainConfig:
    """One training run. Model shape: a preset plus overrides; the vocabulary follows the tokenizer."""

    out_dir: str
    stage: str = "main"
    init_from: str | None = None  # checkpoint directory the mtpd and extend stages start from
    # model (main stage)
    preset: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    mtp_depth: int = 2  # D, the number of MTP modules (main stage)
    head_type: str = "deepseek"
    vocab_size: int = 4096  # of a newly trained tokenizer
    tokenizer: str | None = None  # an existing tokenizer.json instead of training one
    # data
    seq_len: int = 256
    batch_size: int = 16
    max_files: int | None = None  # use only the first N files of each split (smoke runs, tests)
    # optimisation
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # objectives
    mtp_lambda: float = 0.3  # DeepSeek-V3 uses 0.3, then 0.1
    kl_beta: float = 1.0  # mtpd / extend
    kl_top_n: int = 64  # mtpd / extend: teacher restricted to its top-N logits
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free balancing; 0 turns it off
    # run
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # "bfloat16": autocast compute, float32 weights and optimizer state
    checkpoint_every: int = 500
    eval_every: int = 500
    eval_batches: int = 8
    log_every: int = 10
    resume: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.stage != "main" and not self.init_from and not self.resume:
            raise ValueError(f"stage {self.stage!r} needs init_from (a trained checkpoint directory)")
        if self.dtype not in AMP_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(AMP_DTYPES)}, got {self.dtype!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available")
        for name in ("seq_len", "batch_size", "steps", "checkpoint_every", "eval_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mtp_depth < 0 or self.warmup_steps < 0 or self.eval_batches < 0 or self.kl_top_n < 0:
            raise ValueError("mtp_depth, warmup_steps, eval_batches and kl_top_n must be >= 0")
        if self.seq_len <= self.mtp_depth + 1:
            raise ValueError(f"seq_len={self.seq_len} leaves no positions for {self.mtp_depth} MTP modules")
