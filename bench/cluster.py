"""Serving benchmark: the disaggregated cluster against the colocated engine, under the same open-loop load.

    python bench/cluster.py --model models/tiny-code --rate 2 --num-requests 64
    python bench/cluster.py --model models/tiny-code --targets colocated --rate 4 --prompt-len 64:256

Targets, each behind the same gRPC Gateway API and driven by the same requests:
  cluster       `tandem up`'s topology (controller, 2 expert servers, 1 prefill, 1 decode, gateway), MTP on
  colocated     one gateway process running the whole engine in-process, MTP on
  cluster-nomtp the cluster with speculative decoding off
Requests arrive as a Poisson process at --rate per second; prompt and output lengths are drawn uniformly from
--prompt-len and --output-len (LO:HI); prompts are windows of the held-out stdlib packages (tandem.train.data),
tokenized with the model's tokenizer (random token ids when it has none). Every request is greedy with
max_tokens = its output length. Reported per target: output-token throughput, time to first token (TTFT),
inter-token latency (ITL: the gap between two streamed messages, spread over the tokens of the later one) and
end-to-end latency, mean and percentiles. Writes results.json and latency.png into --out.

Profile (results.json "profile", and printed): every service exports Prometheus metrics; their growth over the
measured load (scraped before and after it, the warm-up excluded) splits one engine step of each attention
worker into
  step              tandem_engine_step_seconds{phase} on the worker: schedule, forward, sampling, MTP drafting
  expert exchange   tandem_expert_exchange_seconds_total on the worker: grouping its tokens per expert server,
                    sending them, waiting for and combining the replies (one exchange per MoE layer per forward)
  expert compute    tandem_expert_compute_seconds_total{source_rank=<the worker's rank>} summed over the expert
                    servers: their FFN time for this worker's tokens (servers run in parallel, so the wall time
                    of an exchange holds at most the slowest server's share)
  transport+queue   exchange - compute: serialisation, gloo transfers, and waiting behind other workers' requests
                    (an expert server computes one request at a time)
  worker compute    step - exchange: attention, dense layers, shared experts, router, sampling, drafting, and
                    the engine's bookkeeping
The colocated target reports its step time alone (tandem_engine_step_seconds{phase="colocated"}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from tqdm import tqdm

from tandem.cluster.launcher import LocalCluster, free_port, free_port_range, health_status
from tandem.cluster.metrics import scrape
from tandem.cluster.topology import Topology
from tandem.gateway.client import GatewayClient
from tandem.v1 import controller_pb2 as cpb
from tandem.v1 import controller_pb2_grpc as cpb_grpc
from tandem.v1 import gateway_pb2 as pb

TARGETS = ("cluster", "colocated", "cluster-nomtp")
PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class Result:
    """One request's timeline, seconds from its send time."""

    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    accepted_drafts: int = 0
    error: str | None = None


def length_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI with 1 <= LO <= HI")
    return lo, hi


def held_out_prompts(model: Path, count: int, lengths: tuple[int, int], vocab_size: int, seed: int) -> list[list[int]]:
    """`count` prompts: token windows of the held-out stdlib code, each of a length drawn from `lengths`."""
    from tandem.model.tokenizer import load_tokenizer
    from tandem.train.data import encode_files, split_corpus

    rng = random.Random(seed)
    tokenizer = load_tokenizer(model)
    sizes = [rng.randint(*lengths) for _ in range(count)]
    if tokenizer is None:
        return [[rng.randrange(vocab_size) for _ in range(n)] for n in sizes]
    stream = encode_files(tokenizer, split_corpus().heldout[:40]).tolist()
    return [stream[start:start + n] for n in sizes for start in [rng.randrange(len(stream) - n)]]


def run_load(address: str, prompts: list[list[int]], outputs: list[int], rate: float, seed: int,
             desc: str) -> tuple[list[Result], float]:
    """Send every request at its Poisson arrival time, each in its own thread; (results, wall seconds)."""
    rng = random.Random(seed)
    arrivals = np.cumsum([rng.expovariate(rate) for _ in prompts]) if rate > 0 else np.zeros(len(prompts))
    results = [Result(len(p)) for p in prompts]
    client = GatewayClient(address)
    client.wait_ready(60)
    bar = tqdm(total=len(prompts), desc=desc, unit="req")

    def one(i: int) -> None:
        r = results[i]
        request = pb.GenerateRequest(prompt_token_ids=prompts[i], max_tokens=outputs[i])
        start = last = time.perf_counter()
        try:
            for response in client.stream(request, timeout_s=600):
                now = time.perf_counter()
                n = len(response.token_ids)
                if n:
                    if r.ttft_s is None:
                        r.ttft_s = now - start
                    else:
                        r.itl_s += [(now - last) / n] * n
                    last = now
                r.output_tokens += n
                r.accepted_drafts += response.usage.num_accepted_draft_tokens
            r.e2e_s = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - a failed request is a result of the benchmark, not its end
            r.error = f"{type(e).__name__}: {e}"
        bar.update()

    threads = []
    t0 = time.perf_counter()
    for i, at in enumerate(arrivals):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    bar.close()
    client.close()
    return results, wall


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    out_tokens = sum(r.output_tokens for r in ok)

    def stats(values: list[float]) -> dict:
        if not values:
            return {}
        ms = np.asarray(values) * 1000
        return {"mean_ms": float(ms.mean()), **{f"p{p}_ms": float(np.percentile(ms, p)) for p in PERCENTILES}}

    return {"requests": len(results), "failed": len(results) - len(ok), "errors": sorted({r.error for r in results
                                                                                          if r.error})[:5],
            "wall_s": wall_s, "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall_s,
            "requests_per_s": len(ok) / wall_s, "accepted_draft_tokens": sum(r.accepted_drafts for r in ok),
            "ttft": stats([r.ttft_s for r in ok if r.ttft_s is not None]),
            "itl": stats([x for r in ok for x in r.itl_s]), "e2e": stats([r.e2e_s for r in ok])}


# --- the profile ---------------------------------------------------------------------------------------------
@dataclass(slots=True)
class ProfiledWorker:
    """An engine whose steps the profile splits: its metrics port, its step phase, and (in the cluster) its
    data-plane rank and the expert servers' metrics ports."""

    phase: str
    metrics_port: int
    rank: int | None = None
    expert_ports: list[int] = field(default_factory=list)

    def scrape(self) -> dict:
        return {"worker": scrape(self.metrics_port), "experts": [scrape(port) for port in self.expert_ports]}

    def profile(self, before: dict, after: dict) -> dict:
        """Per engine step over the interval between two `scrape`s, in milliseconds."""
        def grew(name: str, b: dict, a: dict) -> float:
            return a.get(name, 0.0) - b.get(name, 0.0)

        w0, w1 = before["worker"], after["worker"]
        steps = grew(f'tandem_engine_step_seconds_count{{phase="{self.phase}"}}', w0, w1)
        step_s = grew(f'tandem_engine_step_seconds_sum{{phase="{self.phase}"}}', w0, w1)
        out = {"steps": int(steps), "step_ms": 1000 * step_s / steps if steps else None}
        if self.rank is None or not steps:
            return out
        exchanges = grew("tandem_expert_exchanges_total", w0, w1)
        exchange_s = grew("tandem_expert_exchange_seconds_total", w0, w1)
        compute_name = f'tandem_expert_compute_seconds_total{{source_rank="{self.rank}"}}'
        compute_s = sum(grew(compute_name, b, a) for b, a in zip(before["experts"], after["experts"], strict=True))
        per_step = {"expert_exchange_ms": exchange_s, "expert_compute_ms": compute_s,
                    "transport_and_queue_ms": exchange_s - compute_s, "worker_compute_ms": step_s - exchange_s}
        out.update({k: 1000 * v / steps for k, v in per_step.items()})
        out.update(exchanges_per_step=exchanges / steps, exchange_share=exchange_s / step_s,
                   expert_compute_share=compute_s / step_s)
        return out


def cluster_workers(topology: Topology) -> list[ProfiledWorker]:
    """The first prefill and decode workers of a running cluster, with their ranks from the controller."""
    with grpc.insecure_channel(f"127.0.0.1:{topology.controller_port}") as channel:
        members = cpb_grpc.ControllerStub(channel).ListMembers(cpb.ListMembersRequest(), timeout=5).members
    rank = {(m.role, m.index): m.rank for m in members}
    experts = [topology.metrics_port(f"expert-{i}") for i in range(topology.num_expert_servers)]
    return [ProfiledWorker(phase, topology.metrics_port(f"{phase}-0"), rank[(role, 0)], experts)
            for phase, role in (("decode", cpb.ROLE_DECODE), ("prefill", cpb.ROLE_PREFILL))]


def print_profile(name: str, profile: dict) -> None:
    for phase, p in profile.items():
        engine = name if phase == name else f"{name} {phase}"
        if not p.get("steps"):
            print(f"  {engine}: no steps measured", flush=True)
            continue
        line = f"  {engine} step: {p['step_ms']:.2f} ms mean over {p['steps']} steps"
        if "expert_exchange_ms" in p:
            line += (f"; waiting on expert servers {p['expert_exchange_ms']:.2f} ms ({100 * p['exchange_share']:.0f}%,"
                     f" {p['exchanges_per_step']:.1f} exchanges), of which expert compute on the servers "
                     f"{p['expert_compute_ms']:.2f} ms ({100 * p['expert_compute_share']:.0f}%, summed over servers) "
                     f"and transport/queueing {p['transport_and_queue_ms']:.2f} ms; the rest on the worker "
                     f"(attention, dense, router, sampling, drafting) {p['worker_compute_ms']:.2f} ms")
        print(line, flush=True)


# --- the targets ----------------------------------------------------------------------------------------------
class ColocatedGateway:
    """`tandem serve gateway` without a controller: the whole engine in one process."""

    def __init__(self, model: Path, log_dir: Path, speculative_tokens: int | None):
        self.port, self.metrics_port = free_port(), free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "tandem.cli", "serve", "gateway", "--model", str(model), "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        if speculative_tokens is not None:
            argv += ["--num-speculative-tokens", str(speculative_tokens)]
        with open(log_dir / "colocated-gateway.log", "w") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"
        while health_status(self.address) != health_pb2.HealthCheckResponse.SERVING:
            if self.process.poll() is not None:
                raise RuntimeError(f"the colocated gateway exited; see {log_dir / 'colocated-gateway.log'}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def start_target(name: str, model: Path, log_dir: Path,
                 speculative_tokens: int | None) -> tuple[str, Callable[[], None], list[ProfiledWorker]]:
    """(address, stop function, the engines to profile) of a running target."""
    if name == "colocated":
        gateway = ColocatedGateway(model, log_dir / name, speculative_tokens)
        return gateway.address, gateway.stop, [ProfiledWorker("colocated", gateway.metrics_port)]
    for _ in range(20):  # the random port ranges may overlap; Topology refuses that
        ports = [free_port() for _ in range(3)]
        try:
            topology = Topology(model=str(model), controller_port=ports[0], store_port=ports[1],
                                gateway_port=ports[2], service_port_base=free_port_range(4),
                                metrics_port_base=free_port_range(6),  # one per service
                                num_speculative_tokens=0 if name == "cluster-nomtp" else speculative_tokens)
            break
        except ValueError:
            continue
    else:
        raise RuntimeError("no free ports for the cluster")
    cluster = LocalCluster(topology, log_dir / name).start()
    return cluster.gateway_address, cluster.stop, cluster_workers(topology)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    axes[0].bar(names, [results[n]["output_tokens_per_s"] for n in names], color="tab:blue")
    axes[0].set_title("output tokens / s")
    for ax, metric in zip(axes[1:], ("ttft", "itl", "e2e")):
        width = 0.8 / len(PERCENTILES)
        for j, p in enumerate(PERCENTILES):
            ax.bar(np.arange(len(names)) + j * width, [results[n][metric].get(f"p{p}_ms", 0) for n in names],
                   width, label=f"p{p}")
        ax.set_xticks(np.arange(len(names)) + width, names)
        ax.set_title(f"{metric.upper()} (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/tiny-code"), help="checkpoint directory")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}")
    p.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (0 = all at once)")
    p.add_argument("--num-requests", type=int, default=32, help="requests per target")
    p.add_argument("--prompt-len", type=length_range, default=(32, 256), help="prompt tokens LO:HI (uniform)")
    p.add_argument("--output-len", type=length_range, default=(16, 128), help="output tokens LO:HI (uniform)")
    p.add_argument("--speculative-tokens", type=int, default=None, help="MTP drafts per step at most (default: the "
                                                                        "model's depth) for the MTP targets")
    p.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    p.add_argument("--warmup-runs", type=int, default=1,
                   help="times the whole load runs unmeasured first, so that each target is measured as a server is "
                        "after its first requests (its speculation policy calibrated); 0: two short requests only")
    p.add_argument("--out", type=Path, default=Path("bench/results/cluster"), help="output directory")
    args = p.parse_args()
    if args.warmup_runs < 0:
        p.error(f"--warmup-runs must be >= 0, got {args.warmup_runs}")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        p.error(f"--targets: unknown {', '.join(sorted(unknown))} (choose from {', '.join(TARGETS)})")
    if not (args.model / "config.json").is_file():
        p.error(f"--model {args.model}: no config.json there")
    from tandem.model.config import ModelConfig
    config = ModelConfig.from_file(args.model)
    rng = random.Random(args.seed)
    prompts = held_out_prompts(args.model, args.num_requests, args.prompt_len, config.vocab_size, args.seed)
    outputs = [rng.randint(*args.output_len) for _ in prompts]
    args.out.mkdir(parents=True, exist_ok=True)
    results, profile = {}, {}
    for name in targets:
        address, stop, engines = start_target(name, args.model, args.out / "logs", args.speculative_tokens)
        try:
            run_load(address, prompts[:2], [4, 4], 0, args.seed, f"{name} warm-up")
            for i in range(args.warmup_runs):
                run_load(address, prompts, outputs, args.rate, args.seed + 1 + i, f"{name} warm-up {i + 1}")
            before = [e.scrape() for e in engines]
            samples, wall = run_load(address, prompts, outputs, args.rate, args.seed, name)
            # a worker publishes a step's times once the step ended, before its tokens went out: all in by now
            profile[name] = {e.phase: e.profile(b, e.scrape()) for e, b in zip(engines, before, strict=True)}
        finally:
            stop()
        results[name] = summarize(samples, wall)
        r = results[name]
        print(f"{name}: {r['output_tokens_per_s']:.1f} output tok/s, TTFT p50 {r['ttft'].get('p50_ms', 0):.0f} ms, "
              f"ITL p50 {r['itl'].get('p50_ms', 0):.1f} ms, e2e p50 {r['e2e'].get('p50_ms', 0):.0f} ms, "
              f"{r['failed']} failed", flush=True)
        print_profile(name, profile[name])
    ratios = {}
    if "cluster" in results and "colocated" in results:
        ratios["cluster_over_colocated_throughput"] = (results["cluster"]["output_tokens_per_s"]
                                                       / results["colocated"]["output_tokens_per_s"])
    if "cluster" in results and "cluster-nomtp" in results:
        ratios["mtp_over_nomtp_throughput"] = (results["cluster"]["output_tokens_per_s"]
                                               / results["cluster-nomtp"]["output_tokens_per_s"])
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "results": results,
              "ratios": ratios, "profile": profile}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, args.out / "latency.png")
    print(json.dumps(ratios, indent=2))
    print(f"wrote {args.out / 'results.json'} and {args.out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
