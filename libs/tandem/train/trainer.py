"""Training loop: data -> model -> AdamW steps with load balancing -> held-out evaluation -> checkpoints.

Stages (see `objectives`):
- "main": a fresh model of a preset shape, main model and MTP modules trained jointly.
- "mtpd": from `init_from`, main model and head frozen, the MTP modules trained with CE + beta * top-N KL
  toward the main head (beta = 0 gives the cross-entropy-only control on the same data and steps).
- "extend": from `init_from` with m MTP modules, grow to 2m, module m+j initialised as a copy of module j
  (the looped extension of MTP-D: the second group replays the first), only the new modules trained.

A checkpoint is a Hugging Face-layout directory `out_dir/step-NNNNNN` (what `load_model` reads) plus
`trainer_state.pt` (optimizer, step, RNG, the TrainConfig); `out_dir/latest` names the newest. Batches
depend only on (seed, step), so `resume` continues the run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from tandem.model.checkpoint import save_checkpoint
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM, MoE
from tandem.model.loading import export_state_dict, load_model
from tandem.model.presets import preset_config, random_model
from tandem.train.balancing import ExpertLoad
from tandem.train.config import AMP_DTYPES, TrainConfig
from tandem.train.data import encode_files, eval_windows, split_corpus, training_batch
from tandem.train.objectives import compute_terms, total_loss, zero_token_input_
from tandem.train.tokenizer import train_tokenizer

STATE_FILE = "trainer_state.pt"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --- model setup ----------------------------------------------------------------------------------------------

def extend_mtp_modules(model: DeepseekV3ForCausalLM) -> DeepseekV3ForCausalLM:
    """Looped extension: the same model with 2m MTP modules, module m+j (1-based) a copy of module j."""
    c = model.config
    m, N = c.num_nextn_predict_layers, c.num_hidden_layers
    if m == 0:
        raise ValueError("looped extension needs a model with at least one MTP module")
    state = model.state_dict()
    for j in range(m):
        src, dst = f"model.layers.{N + j}.", f"model.layers.{N + m + j}."
        state.update({dst + k[len(src):]: v.clone() for k, v in list(state.items()) if k.startswith(src)})
    device = model.lm_head.weight.device
    with torch.device("meta"):
        grown = DeepseekV3ForCausalLM(dataclasses.replace(c, num_nextn_predict_layers=2 * m), mtp_input=model.mtp_input)
    grown.to_empty(device=device)
    grown.init_buffers()
    grown.load_state_dict(state, strict=True)
    return grown


def first_trained_module(stage: str, model: DeepseekV3ForCausalLM) -> int:
    """Index of the first trained MTP module: all of them, except in the extension stage the new half."""
    return len(model.mtp_layers) // 2 if stage == "extend" else 0


def set_trainable(model: DeepseekV3ForCausalLM, stage: str) -> list[MoE]:
    """Set requires_grad for the stage; returns the MoE layers whose correction biases this stage balances."""
    first = first_trained_module(stage, model)
    trained = [model] if stage == "main" else model.mtp_layers[first:]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in trained:
        for name, p in module.named_parameters():
            p.requires_grad_(not name.endswith("e_score_correction_bias"))
    return [m for module in trained for m in module.modules() if isinstance(m, MoE)]


def build_optimizer(model: DeepseekV3ForCausalLM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices (and expert banks) decay, norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# --- the trainer ----------------------------------------------------------------------------------------------

class Trainer:
    """Holds one run's data, model and optimizer; `run` trains to cfg.steps and returns the last checkpoint."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        self.step = 0
        resume_dir = self._latest_checkpoint() if cfg.resume else None
        if cfg.resume and resume_dir is None:
            raise ValueError(f"--resume: no checkpoint in {self.out} (expected {self.out}/latest)")
        self.tokenizer_path = self._tokenizer_path(resume_dir)
        self.tokenizer = self._load_or_train_tokenizer()
        split = split_corpus().limited(cfg.max_files)
        self.train_stream = encode_files(self.tokenizer, split.train)
        self.heldout_stream = encode_files(self.tokenizer, split.heldout)

        if resume_dir is not None:
            self.model = load_model(resume_dir, device=self.device, column_major=False)
        elif cfg.stage == "main":
            self.model = self._new_model()
        else:
            self.model = load_model(cfg.init_from, device=self.device, column_major=False)
            if cfg.stage == "extend":
                self.model = extend_mtp_modules(self.model)
        self.model.train()
        self.head_type = self.model.config.mtp_head_type
        self.first_trained = first_trained_module(cfg.stage, self.model)
        self.load = ExpertLoad(set_trainable(self.model, cfg.stage))
        self.optimizer = build_optimizer(self.model, cfg)
        if resume_dir is not None:
            self._load_state(resume_dir / STATE_FILE)

    # setup ---------------------------------------------------------------------------------------------------
    def _latest_checkpoint(self) -> Path | None:
        latest = self.out / "latest"
        return self.out / latest.read_text().strip() if latest.exists() else None

    def _tokenizer_path(self, resume_dir: Path | None) -> Path:
        if resume_dir is not None:
            return resume_dir / "tokenizer.json"
        if self.cfg.tokenizer:
            return Path(self.cfg.tokenizer)
        if self.cfg.stage != "main":
            return Path(self.cfg.init_from) / "tokenizer.json"
        return self.out / "tokenizer.json"

    def _load_or_train_tokenizer(self) -> Tokenizer:
        if self.tokenizer_path.exists():
            return Tokenizer.from_file(str(self.tokenizer_path))
        split = split_corpus().limited(self.cfg.max_files)
        tokenizer = train_tokenizer(split.train, self.cfg.vocab_size)
        tokenizer.save(str(self.tokenizer_path))
        return tokenizer

    def _new_model(self) -> DeepseekV3ForCausalLM:
        cfg = self.cfg
        config = preset_config(cfg.preset, **{
            **cfg.model_overrides, "vocab_size": self.tokenizer.get_vocab_size(),
            "num_nextn_predict_layers": cfg.mtp_depth, "bos_token_id": self.tokenizer.token_to_id("<|bos|>"),
            "eos_token_id": (self.tokenizer.token_to_id("<|eos|>"),), "mtp_head_type": cfg.head_type})
        if cfg.seq_len + 1 > config.max_position_embeddings:
            raise ValueError(f"seq_len={cfg.seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
        model = random_model(config, seed=cfg.seed, device=self.device)
        if cfg.head_type == "meta":
            zero_token_input_(model)
        return model

    # one step ------------------------------------------------------------------------------------------------
    def _autocast(self):
        amp = AMP_DTYPES[self.cfg.dtype]
        return torch.autocast(self.device.type, dtype=amp, enabled=amp is not None)

    def _terms(self, windows: torch.Tensor, with_metrics: bool = False) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        with self._autocast():
            return compute_terms(self.model, windows, head_type=self.head_type,
                                 first_trained_module=self.first_trained, train_main=cfg.stage == "main",
                                 kl_top_n=cfg.kl_top_n if cfg.stage != "main" else 0, with_metrics=with_metrics)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on the batch of `self.step`; returns the loss terms (floats)."""
        cfg = self.cfg
        windows = training_batch(self.train_stream, cfg.seq_len + 1, cfg.batch_size, cfg.seed, self.step)
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.load.enabled = True
        terms = self._terms(windows.to(self.device))
        loss = total_loss(terms, stage=cfg.stage, mtp_lambda=cfg.mtp_lambda, kl_beta=cfg.kl_beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        self.optimizer.step()
        max_vio = self.load.update_biases(cfg.bias_update_speed)
        self.step += 1
        out = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}, "lr": lr, "max_vio": max_vio}
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss terms and top-1 metrics, averaged over fixed windows of the held-out stream."""
        cfg = self.cfg
        windows = eval_windows(self.heldout_stream, cfg.seq_len + 1, cfg.eval_batches * cfg.batch_size)
        self.load.enabled = False
        sums: dict[str, float] = {}
        batches = windows.split(cfg.batch_size)
        for batch in batches:
            for name, value in self._terms(batch.to(self.device), with_metrics=True).items():
                sums[name] = sums.get(name, 0.0) + float(value)
        self.load.enabled = True
        return {name: total / len(batches) for name, total in sums.items()}

    # checkpoints ---------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write out_dir/step-NNNNNN atomically (temp dir, then rename) and point out_dir/latest at it."""
        name = f"step-{self.step:06d}"
        final, tmp = self.out / name, self.out / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, self.model.config, export_state_dict(self.model), tokenizer_json=self.tokenizer_path)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "train_config": dataclasses.asdict(self.cfg)}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (self.out / "latest").write_text(name + "\n")
        return final

    def _load_state(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # the loop ------------------------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def run(self) -> Path:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * cfg.seq_len
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {cfg.stage}", unit="step",
                   disable=not cfg.show_progress, dynamic_ncols=True)
        last = None
        window_time, window_steps = 0.0, 0  # training steps only, evaluation and checkpoints left out
        while self.step < cfg.steps:
            started = time.perf_counter()
            record = self.train_step()  # reads the losses back, so the device has finished the step
            window_time += time.perf_counter() - started
            window_steps += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                record["tokens_per_s"] = window_steps * tokens_per_step / window_time
                self._log({"step": self.step, "split": "train", **record})
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                                 if k == "loss" or k.startswith(("main", "mtp", "kl"))}
                                | {"max_vio": f"{record['max_vio']:.2f}", "tok/s": f"{record['tokens_per_s']:.0f}"})
                window_time, window_steps = 0.0, 0
            bar.update(1)
            done = self.step == cfg.steps
            if cfg.eval_batches and (self.step % cfg.eval_every == 0 or done):
                held = self.evaluate()
                self._log({"step": self.step, "split": "heldout", **held})
                bar.write(f"step {self.step} held-out: " + " ".join(f"{k}={v:.3f}" for k, v in held.items()))
            if self.step % cfg.checkpoint_every == 0 or done:
                last = self.save()
        bar.close()
        return last if last is not None else self._latest_checkpoint()


def train(cfg: TrainConfig) -> Path:
    """Run a training stage; returns the final checkpoint directory."""
    return Trainer(cfg).run()

