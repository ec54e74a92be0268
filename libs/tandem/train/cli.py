"""`tandem train`: flags map one to one onto `TrainConfig` fields."""

from __future__ import annotations

import argparse
import json

from tandem.train.config import AMP_DTYPES, HEAD_TYPES, STAGES, TrainConfig

_DEFAULTS = TrainConfig(out_dir="")


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    d = _DEFAULTS
    p = sub.add_parser(
        "train", help="train a DeepSeek-V3-architecture model with MTP modules on the stdlib's source",
        description="Train on the Python standard library's source (held-out packages: see tandem.train.data). "
                    "Stages: main (model and MTP modules jointly), mtpd (main frozen, MTP modules self-distilled "
                    "from the main head), extend (looped extension from m to 2m MTP modules). Writes Hugging "
                    "Face-layout checkpoints to OUT/step-NNNNNN.")
    p.add_argument("--out", required=True, help="run directory: tokenizer, checkpoints, metrics.jsonl")
    p.add_argument("--stage", choices=STAGES, default=d.stage, help=f"what to train (default {d.stage})")
    p.add_argument("--init-from", help="checkpoint directory the mtpd and extend stages start from")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest (same flags as the first run)")
    m = p.add_argument_group("model (main stage)")
    m.add_argument("--preset", default=d.preset, help=f"model shape (default {d.preset})")
    m.add_argument("--model-override", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. hidden_size=128 (repeatable; VALUE is JSON)")
    m.add_argument("--mtp-depth", type=int, default=d.mtp_depth, help=f"MTP modules D (default {d.mtp_depth})")
    m.add_argument("--head-type", choices=HEAD_TYPES, default=d.head_type,
                   help="deepseek: sequential modules (causal chain); meta: independent parallel heads "
                        f"(default {d.head_type})")
    m.add_argument("--vocab-size", type=int, default=d.vocab_size,
                   help=f"size of a newly trained tokenizer (default {d.vocab_size})")
    m.add_argument("--tokenizer", help="use this tokenizer.json instead of training one")
    data = p.add_argument_group("data")
    data.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    data.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per step (default {d.batch_size})")
    data.add_argument("--max-files", type=int, help="only the first N files of each split (smoke runs)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    opt.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                     help=f"cosine decay floor as a fraction of --lr (default {d.min_lr_ratio})")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help=f"(default {d.warmup_steps})")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    opt.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"0 = off (default {d.grad_clip})")
    obj = p.add_argument_group("objectives")
    obj.add_argument("--mtp-lambda", type=float, default=d.mtp_lambda,
                     help=f"main stage: weight of the mean MTP loss (default {d.mtp_lambda})")
    obj.add_argument("--kl-beta", type=float, default=d.kl_beta,
                     help=f"mtpd/extend: weight of the KL term; 0 = cross-entropy only (default {d.kl_beta})")
    obj.add_argument("--kl-top-n", type=int, default=d.kl_top_n,
                     help=f"mtpd/extend: teacher restricted to its top-N logits (default {d.kl_top_n})")
    obj.add_argument("--bias-update-speed", type=float, default=d.bias_update_speed,
                     help=f"gamma of aux-loss-free load balancing; 0 = off (default {d.bias_update_speed})")
    run = p.add_argument_group("run")
    run.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    run.add_argument("--device", default=d.device, help=f"cpu, cuda or cuda:N (default {d.device})")
    run.add_argument("--dtype", choices=sorted(AMP_DTYPES), default=d.dtype,
                     help=f"compute dtype; weights stay float32 (default {d.dtype})")
    run.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"(default {d.checkpoint_every})")
    run.add_argument("--eval-every", type=int, default=d.eval_every, help=f"(default {d.eval_every})")
    run.add_argument("--eval-batches", type=int, default=d.eval_batches,
                     help=f"held-out batches per evaluation; 0 = none (default {d.eval_batches})")
    run.add_argument("--log-every", type=int, default=d.log_every, help=f"(default {d.log_every})")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out_dir=args.out, stage=args.stage, init_from=args.init_from, preset=args.preset,
        model_overrides=dict(args.model_override), mtp_depth=args.mtp_depth, head_type=args.head_type,
        vocab_size=args.vocab_size, tokenizer=args.tokenizer, seq_len=args.seq_len, batch_size=args.batch_size,
        max_files=args.max_files, steps=args.steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        mtp_lambda=args.mtp_lambda, kl_beta=args.kl_beta, kl_top_n=args.kl_top_n,
        bias_update_speed=args.bias_update_speed, seed=args.seed, device=args.device, dtype=args.dtype,
        checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_batches=args.eval_batches,
        log_every=args.log_every, resume=args.resume, show_progress=not args.no_progress)


def _cmd_train(args: argparse.Namespace) -> int:
    from tandem.train.trainer import train

    final = train(config_from_args(args))
    print(f"wrote {final}")
    return 0
