"""Record expert loads from a trained model serving held-out code, for `bench/eplb.py --recorded`.

Tandem's colocated engine serves prompts cut from the held-out stdlib packages (tandem.train.data.HELD_OUT),
greedy, with continuous batching (up to --concurrency requests in flight; a finished request's place goes to
the next one at once) and MTP speculative decoding as serving runs it by default (up to the model's MTP depth
of drafts per step, chosen adaptively from measured timings: on a slow CPU it may stop drafting, and the MTP
layers then see no tokens for a while; --no-adaptive-speculation always drafts). A forward pre-hook on each MoE layer's experts (placement rows =
tandem.transport.expert_parallel.moe_layer_ids: the MTP layers included) counts the tokens routed to each
logical expert: prefill chunks, verified and rejected drafts and MTP drafting, all that an expert server
would compute. Window t holds what was routed from the end of window t-1 until the (t+1) x W-th request
finished (W = --requests-per-window).

Prompts are taken in the held-out stream's order (argparse, difflib, email, json, ..., unittest), evenly
spaced over it, so the code served drifts from package to package over the windows as a live mix would;
--shuffle draws them at random positions instead. Writes --out (default bench/results/expert_load/load.json):

    {"load": [windows][layers][experts], "model": DIR, "requests_per_window": W, "layer_ids": [...],
     "n_routed_experts": E, "n_group": G, ...}

    OMP_NUM_THREADS=1 python bench/record_expert_load.py --model build/train-main/step-000600 \\
        --requests-per-window 4 --windows 20 --new-tokens 64
    python bench/eplb.py --recorded bench/results/expert_load/load.json --servers 4 --slots-per-server 5 --nodes 1,2
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.loading import load_model
from tandem.model.tokenizer import load_tokenizer
from tandem.moe.experts import LocalExperts
from tandem.train.data import HELD_OUT, encode_files, split_corpus
from tandem.transport.expert_parallel import moe_layer_ids

DEFAULT_OUT = Path("bench/results/expert_load/load.json")


def length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or LO:HI with 0 < LO <= HI, got {text!r}")
    return lo, hi


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--windows", type=int, default=20, help="windows to record (default 20)")
    p.add_argument("--requests-per-window", type=int, default=4, help="finished requests per window (default 4)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="requests in flight at most (default --requests-per-window)")
    p.add_argument("--prompt-len", type=length_range, default=(32, 256),
                   help="prompt tokens, N or LO:HI drawn uniformly per request (default 32:256)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--speculative-tokens", type=int, default=None,
                   help="MTP drafts per step at most (default: the model's MTP depth; 0 = no speculation)")
    p.add_argument("--no-adaptive-speculation", action="store_true",
                   help="always draft --speculative-tokens tokens instead of choosing per step from measured "
                        "gains (the engine's default, which depends on the machine's timings)")
    p.add_argument("--shuffle", action="store_true", help="prompts at random positions of the held-out stream")
    p.add_argument("--seed", type=int, default=0, help="prompt lengths and --shuffle positions (default 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"loads file to write (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    for name in ("windows", "requests_per_window", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.windows < 2:
        p.error("--windows must be >= 2: bench/eplb.py re-plans from the second window on")
    args.concurrency = args.concurrency or args.requests_per_window
    if args.concurrency < 1:
        p.error("--concurrency must be >= 1")
    if not (Path(args.model) / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def held_out_prompts(model_dir: str, count: int, lengths: tuple[int, int], shuffle: bool,
                     seed: int) -> list[list[int]]:
    """`count` token windows of the held-out stream, lengths drawn from `lengths`; in stream order, evenly
    spaced (or at random positions with `shuffle`)."""
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise SystemExit(f"{model_dir} has no tokenizer.json: held-out prompts need the model's tokenizer")
    stream = encode_files(tokenizer, split_corpus().heldout).tolist()
    rng = random.Random(seed)
    sizes = [rng.randint(*lengths) for _ in range(count)]
    room = len(stream) - lengths[1]
    if room <= 0:
        raise SystemExit(f"the held-out stream has {len(stream)} tokens, fewer than a {lengths[1]}-token prompt")
    starts = [rng.randrange(room) for _ in range(count)] if shuffle \
        else [i * room // max(count - 1, 1) for i in range(count)]
    return [stream[s:s + n] for s, n in zip(starts, sizes)]


class ExpertCounter:
    """Tokens routed to each logical expert of each MoE layer ([rows, experts]), from forward pre-hooks."""

    def __init__(self, model):
        config = model.config
        self.layer_ids = moe_layer_ids(config)
        self.counts = torch.zeros(len(self.layer_ids), config.n_routed_experts, dtype=torch.int64,
                                  device=model.lm_head.weight.device)
        self._hooks = []
        for row, layer_id in enumerate(self.layer_ids):
            experts = model.model.layers[layer_id].mlp.experts
            if not isinstance(experts, LocalExperts):
                raise TypeError(f"layer {layer_id}: expected LocalExperts, got {type(experts).__name__}")
            self._hooks.append(experts.register_forward_pre_hook(self._hook(row)))

    def _hook(self, row: int):
        def count(_module, args) -> None:  # args = (x, expert_ids, weights)
            self.counts[row] += torch.bincount(args[1].flatten(), minlength=self.counts.shape[1])
        return count

    def take(self) -> list[list[int]]:
        """The counts since the last take, and reset."""
        out = self.counts.cpu().tolist()
        self.counts.zero_()
        return out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def record(engine: Engine, prompts: list[list[int]], new_tokens: int, per_window: int, concurrency: int,
           counter: ExpertCounter, progress: tqdm) -> tuple[list, list[dict]]:
    """Serve the prompts with continuous batching; the loads and engine statistics of each window."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    pending = list(reversed(prompts))
    loads, stats = [], []
    in_flight = finished = steps = tokens = 0
    started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            engine.add_request(pending.pop(), params)
            in_flight += 1
        outputs = engine.step()
        steps += 1
        for out in outputs:
            tokens += len(out.new_token_ids)
            if out.finished:
                in_flight -= 1
                finished += 1
                progress.update(1)
                if finished % per_window == 0:
                    loads.append(counter.take())
                    stats.append({"steps": steps, "output_tokens": tokens,
                                  "seconds": round(time.perf_counter() - started, 3)})
                    steps = tokens = 0
                    started = time.perf_counter()
                    progress.set_postfix_str(f"window {len(loads)}")
    return loads, stats


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    total = args.windows * args.requests_per_window
    prompts = held_out_prompts(args.model, total, args.prompt_len, args.shuffle, args.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = load_model(args.model, dtype=dtype, device=args.device)
    config = model.config
    spec = config.num_nextn_predict_layers if args.speculative_tokens is None else args.speculative_tokens
    engine = Engine(model, EngineConfig(max_num_seqs=args.concurrency, num_speculative_tokens=spec,
                                        adaptive_speculation=not args.no_adaptive_speculation))
    counter = ExpertCounter(model)
    began = time.perf_counter()
    try:
        with tqdm(total=total, desc="requests", unit="req", file=sys.stderr) as progress:
            loads, stats = record(engine, prompts, args.new_tokens, args.requests_per_window, args.concurrency,
                                  counter, progress)
    finally:
        counter.remove()
    seconds = time.perf_counter() - began
    report = {
        "load": loads,
        "model": str(args.model),
        "requests_per_window": args.requests_per_window,
        "layer_ids": counter.layer_ids,
        "num_hidden_layers": config.num_hidden_layers,
        "n_routed_experts": config.n_routed_experts,
        "n_group": config.n_group,
        "num_experts_per_tok": config.num_experts_per_tok,
        "concurrency": args.concurrency,
        "prompt_len": list(args.prompt_len),
        "new_tokens": args.new_tokens,
        "speculative_tokens": spec,
        "adaptive_speculation": not args.no_adaptive_speculation,
        "spec": engine.spec_totals.to_dict(),
        "held_out_packages": list(HELD_OUT),
        "shuffle": args.shuffle,
        "seed": args.seed,
        "windows": stats,
        "seconds": round(seconds, 2),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "device": args.device,
                    "dtype": args.dtype, "threads": torch.get_num_threads()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report))
    load = torch.tensor(loads, dtype=torch.float64)  # [W, L, E]
    whole = load.sum(0)
    print(f"{len(loads)} windows x {len(counter.layer_ids)} MoE layers x {config.n_routed_experts} experts "
          f"in {seconds:.1f}s ({config.num_hidden_layers} main layers + {config.num_nextn_predict_layers} MTP)")
    for row, layer_id in enumerate(counter.layer_ids):
        kind = "MTP " if layer_id >= config.num_hidden_layers else ""
        per_window = load[:, row]
        print(f"  {kind}layer {layer_id}: {int(whole[row].sum())} routed, hottest/mean expert "
              f"{float(whole[row].max() / whole[row].mean()):.2f} over the run, "
              f"{float((per_window.max(1).values / per_window.mean(1)).nanmean()):.2f} per window"
              + (f" ({idle} windows without tokens)" if (idle := int((per_window.sum(1) == 0).sum())) else ""))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
