"""Decode attention on the CPU: the MLA decode kernel (`tandem.kernels.mla_decode`) against the same attention as
tensor operations (the keys gathered from the cache into [batch, context] float32, batched matmuls, softmax), on
one attention layer of a model, over a paged bfloat16 (or --dtype) cache with randomly placed blocks.

    python bench/mla_decode.py                                   # the bundled model's first layer
    python bench/mla_decode.py --batch-sizes 1,32 --contexts 4096 --rounds 9

Both run eagerly, alternating round by round; each keeps its fastest round, so that a slow spell of a shared
machine slows them alike. Both include the small eager operations around the attention proper (the queries'
absorption into the latent, the value projection, dtype conversions), most of the time at batch 1; a compiled
step fuses those. The cache is larger than the last-level cache would keep between calls
(`--cache-mb`): each call reads its keys from memory, as a decode step does after the rest of the model ran.
Writes results.json and mla_decode.png into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import machine_info  # noqa: E402  (bench/engine.py)

from tandem.kernels import library, mla_decode  # noqa: E402
from tandem.kernels.tiles import pack_model_  # noqa: E402
from tandem.model.attention_metadata import Paged  # noqa: E402
from tandem.model.loading import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "tiny-code"), help="checkpoint whose first layer runs")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="model and cache dtype")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="sequences per step (comma-separated)")
    p.add_argument("--contexts", default="256,1024", help="positions each sequence attends over (comma-separated)")
    p.add_argument("--block-size", type=int, default=16, help="cache positions per block")
    p.add_argument("--cache-mb", type=int, default=256, help="cache size the steps' blocks are spread over")
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per shape; the fastest is kept")
    p.add_argument("--calls", type=int, default=20, help="calls per round")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "mla_decode"), help="output directory")
    return p.parse_args(argv)


def step_inputs(attention, batch: int, context: int, block_size: int, cache: torch.Tensor, g: torch.Generator):
    """A decode step of `batch` sequences, each at position context - 1 over randomly placed blocks."""
    blocks = context // block_size
    tables = torch.randperm(cache.shape[0] // block_size, generator=g)[:batch * blocks].view(batch, blocks)
    positions = torch.full((batch,), context - 1)
    slots = tables[:, -1] * block_size + (context - 1) % block_size
    meta = Paged.from_block_tables(positions, slots, tables, block_size, [cache])
    H, N, R = attention.num_heads, attention.qk_nope_head_dim, attention.qk_rope_head_dim
    q_nope = torch.randn(batch, H, N, generator=g).to(cache.dtype)
    q_pe = torch.randn(batch, H, R, generator=g).to(cache.dtype)
    return q_nope, q_pe, meta


def in_kernel(attention, q_nope, q_pe, meta) -> torch.Tensor:
    return attention._attend_latent_by_block(q_nope, q_pe, meta.kv_cache[0], meta)


def in_tensor_ops(attention, q_nope, q_pe, meta) -> torch.Tensor:
    """`MLA._attend_paged`'s path without the kernel, in float32 as on the CPU."""
    cache = meta.kv_cache[0]
    keys = cache.index_select(0, meta.key_slots).view(meta.num_seqs, -1, cache.shape[-1])
    return attention._attend_latent(q_nope.float(), q_pe.float(), keys.float(), meta)


def fastest_round(fn, rounds: list[float], calls: int) -> None:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    rounds.append((time.perf_counter() - started) / calls)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, context in enumerate(sorted({r["context"] for r in results})):
        rows = [r for r in results if r["context"] == context]
        batches, color = [r["batch"] for r in rows], f"C{i}"
        ax.plot(batches, [r["tensor_ops_us"] for r in rows], "o--", color=color, label=f"tensor ops, context {context}")
        ax.plot(batches, [r["kernel_us"] for r in rows], "o-", color=color, label=f"kernel, context {context}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequences per step")
    ax.set_ylabel("one layer's attention (us)")
    ax.set_title("CPU decode attention: MLA kernel vs tensor operations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if not library.load():
        sys.exit("the CPU kernels could not be built here (see the warning above)")
    model = load_model(args.model, dtype=dtype)
    pack_model_(model)  # as a CPU engine prepares its weights for the kernels
    attention = model.main_layers[0].self_attn
    if not mla_decode.supports(attention.num_heads, attention.kv_lora_rank):
        sys.exit(f"the kernel does not serve {attention.num_heads} heads of kv_lora_rank {attention.kv_lora_rank}")
    width = attention.kv_lora_rank + attention.qk_rope_head_dim
    slots = args.cache_mb * 2**20 // (width * dtype.itemsize) // args.block_size * args.block_size
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(slots, width, generator=g).to(dtype)
    results = []
    with torch.inference_mode():
        for context in (int(c) for c in args.contexts.split(",")):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                steps = [step_inputs(attention, batch, context, args.block_size, cache, g) for _ in range(8)]
                want, got = in_tensor_ops(attention, *steps[0]), in_kernel(attention, *steps[0])
                # over a bfloat16 cache the kernel rounds queries and probabilities to bfloat16 for its products, as
                # GPU attention does (tests/unit/test_mla_decode_kernel.py holds it to 2^-7)
                tolerance = 2 ** -7 if dtype == torch.bfloat16 else 1e-4
                torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
                times = {"kernel": [], "tensor_ops": []}
                for _ in range(args.rounds):
                    for name, fn in (("kernel", in_kernel), ("tensor_ops", in_tensor_ops)):
                        fastest_round(lambda: [fn(attention, *s) for s in steps], times[name], args.calls)
                row = {"batch": batch, "context": context,
                       **{f"{name}_us": round(min(t) / len(steps) * 1e6, 1) for name, t in times.items()}}
                row["speedup"] = round(row["tensor_ops_us"] / row["kernel_us"], 2)
                print(f"batch {batch:3d} context {context:5d}: kernel {row['kernel_us']:8.1f} us, tensor ops "
                      f"{row['tensor_ops_us']:8.1f} us, {row['speedup']:.2f}x", flush=True)
                results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(torch.device("cpu")), "model": args.model, "dtype": args.dtype,
              "heads": attention.num_heads, "kv_lora_rank": attention.kv_lora_rank,
              "rope_dim": attention.qk_rope_head_dim, "block_size": args.block_size, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, out / "mla_decode.png")
    print(f"wrote {out / 'results.json'} and {out / 'mla_decode.png'}")


if __name__ == "__main__":
    main()
