"""MTP draft acceptance on held-out code: per-position acceptance and mean accepted tokens per verification step.

For each checkpoint (e.g. cross-entropy-only MTP, MTP-D, Meta-style heads) and each k = 1..--max-k drafts,
greedy and sampled, the colocated engine generates from prompts cut out of the held-out stdlib packages
(tandem.train.data.HELD_OUT) with a fixed number of drafts per step, and reports what the engine measured.
Writes results.json and acceptance.png into --out.

    python bench/mtp_acceptance.py --model ce=runs/main/latest --model mtpd=runs/mtpd/latest
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.loading import load_model
from tandem.model.tokenizer import load_tokenizer
from tandem.train.data import HELD_OUT, encode_files, eval_windows, split_corpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                   help="a checkpoint to measure, named for the chart (repeatable)")
    p.add_argument("--max-k", type=int, default=4, help="measure k = 1..max-k drafts per step (default 4)")
    p.add_argument("--temperatures", default="0,0.7", help="comma-separated sampling temperatures (default 0,0.7)")
    p.add_argument("--num-prompts", type=int, default=16, help="held-out prompts (default 16)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", default="bench/results/mtp_acceptance", help="output directory")
    args = p.parse_args(argv)
    models = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not Path(path).is_dir():
            p.error(f"--model {item!r}: expected NAME=DIR with an existing checkpoint directory")
        models[name] = path
    args.models = models
    args.temperatures = [float(t) for t in args.temperatures.split(",")]
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def held_out_prompts(model_dir: str, num_prompts: int, prompt_len: int) -> list[list[int]]:
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise SystemExit(f"{model_dir} has no tokenizer.json: held-out prompts need the model's tokenizer")
    stream = encode_files(tokenizer, split_corpus().heldout)
    return eval_windows(stream, prompt_len, num_prompts).tolist()


def measure(model, prompts: list[list[int]], k: int, temperature: float, new_tokens: int, seed: int) -> dict:
    engine = Engine(model, EngineConfig(num_speculative_tokens=k, adaptive_speculation=False,
                                        max_num_seqs=len(prompts)))
    params = [SamplingParams(max_tokens=new_tokens, temperature=temperature, ignore_eos=True,
                             seed=None if temperature == 0 else seed + i) for i in range(len(prompts))]
    started = time.perf_counter()
    engine.generate(prompts, params)
    result = engine.spec_totals.to_dict()
    result["seconds"] = time.perf_counter() - started
    return result


def plot(results: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    temps = sorted({r["temperature"] for r in results})
    fig, axes = plt.subplots(2, len(temps), figsize=(6 * len(temps), 8), squeeze=False)
    for col, t in enumerate(temps):
        rows = [r for r in results if r["temperature"] == t]
        for name in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == name]
            deepest = max(mine, key=lambda r: r["k"])
            acc = deepest["acceptance_by_position"]
            axes[0][col].plot(range(1, len(acc) + 1), acc, marker="o", label=name)
            axes[1][col].plot([r["k"] for r in mine], [r["mean_accepted_length"] for r in mine], marker="o",
                              label=name)
        axes[0][col].set(title=f"acceptance by draft position, T={t}", xlabel="draft position", ylabel="accepted",
                         ylim=(0, 1))
        axes[1][col].set(title=f"tokens per verification step, T={t}", xlabel="drafts per step k",
                         ylabel="mean accepted length")
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    prompts = held_out_prompts(next(iter(args.models.values())), args.num_prompts, args.prompt_len)
    results = []
    runs = [(n, k, t) for n in args.models for k in range(1, args.max_k + 1) for t in args.temperatures]
    models = {}
    for name, k, t in tqdm(runs, desc="configurations", file=sys.stderr):
        if name not in models:
            models[name] = load_model(args.models[name], dtype=dtype, device=args.device)
        stats = measure(models[name], prompts, k, t, args.new_tokens, args.seed)
        results.append({"model": name, "checkpoint": args.models[name], "k": k, "temperature": t,
                        "num_mtp_modules": models[name].config.num_nextn_predict_layers,
                        "mtp_head_type": models[name].config.mtp_head_type, **stats})
    report = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                          "dtype": args.dtype},
              "held_out_packages": list(HELD_OUT), "num_prompts": len(prompts), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out)
    for r in results:
        acc = ", ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        print(f"{r['model']:>10} k={r['k']} T={r['temperature']}: mean accepted length "
              f"{r['mean_accepted_length']:.2f}, acceptance by position [{acc}]")
    print(f"wrote {out}/results.json and {out}/acceptance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
