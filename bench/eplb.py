"""Expert-parallel load balancing: Tandem's planner against DeepSeek's published EPLB algorithm, re-planned
every window over a run of windows whose expert popularity drifts.

    python bench/eplb.py                      # DeepSeek-V3 shapes, 58 layers, 50 windows of drifting Zipf loads
    python bench/eplb.py --quick              # 8 layers, 12 windows
    python bench/eplb.py --recorded LOAD.json --servers 4 --slots-per-server 5 --nodes 1,2 --policy auto,global

Scenarios: prefill-like, 4 nodes x 8 servers x 9 slots (256 experts in 8 groups + 32 redundant,
hierarchical); decode-like, 320 servers x 1 slot (+64 redundant, global); with --recorded, loads from a file
{"load": [windows][layers][experts]} (bench/record_expert_load.py writes one) on --servers x
--slots-per-server, one scenario per node count in --nodes and Tandem policy in --policy; the expert groups
are --groups, else the file's "n_group", else 1.

Methods, each planning window t from window t's loads:
- deepseek: a re-implementation of DeepSeek's EPLB `rebalance_experts` (github.com/deepseek-ai/EPLB),
  hierarchical when groups % nodes == 0, else global, as theirs; it takes no previous placement;
- global / hierarchical: Tandem's policies from scratch every window;
- migration(m): Tandem's policy for the scenario given the placement it planned for window t-1, margin m;
- static: Tandem's plan for window 0, never re-planned.

With --smooth-windows N (and --decay D), every method plans window t, and is measured, on what the controller
reads from Redis at that moment: the sum over windows t-N+1..t of loads x D**age (the controller's
--rebalance-windows and --rebalance-decay, defaults 6 and 0.8). Without it each window's raw counts are used.

Per re-plan (windows 1..): balancedness before (the previous plan on this window's loads), after (the new
plan on the same loads), and experts moved (a server gaining an expert it did not hold). Writes results.json
and eplb.png into --out (default bench/results/eplb/).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem.eplb.planner import ClusterShape, balancedness, count_moves, plan_placement

DEFAULT_OUT = Path("bench/results/eplb")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- DeepSeek's EPLB, re-implemented from its description ------------------------------------------------

def _pack_equal(weights: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced packing with equal item counts per pack: items heaviest first, each to the lightest pack
    with room (lowest pack on ties). Returns each item's pack and its rank within the pack."""
    num_items = weights.shape[0]
    per_pack = num_items // num_packs
    if per_pack == 1:
        return np.arange(num_items), np.zeros(num_items, np.int64)
    pack, rank = np.empty(num_items, np.int64), np.empty(num_items, np.int64)
    pack_load, pack_items = np.zeros(num_packs), np.zeros(num_packs, np.int64)
    for item in np.argsort(-weights, kind="stable"):
        p = int(np.argmin(np.where(pack_items < per_pack, pack_load, np.inf)))
        pack[item], rank[item] = p, pack_items[p]
        pack_load[p] += weights[item]
        pack_items[p] += 1
    return pack, rank


def deepseek_eplb(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                  num_servers: int) -> np.ndarray:
    """[L, P] phy2log as DeepSeek's `rebalance_experts` plans it (no previous placement).

    Step 1: expert groups packed onto nodes (_pack_equal on group loads); the node's experts are numbered
    node-major. Step 2: inside each node, redundant copies one at a time to the expert with the highest load
    per copy; physical ids are the node's experts in order, then the copies in the order they were made.
    Step 3: the node's physical experts packed onto its servers (_pack_equal on load per copy); the slot is
    server * slots_per_server + rank in the server. Global = the same with one group and one node.
    """
    # L layers, E experts, P physical slots
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_experts // num_nodes
    slots_per_node = num_physical // num_nodes
    servers_per_node = num_servers // num_nodes
    slots_per_server = num_physical // num_servers
    out = np.empty((num_layers, num_physical), np.int64)
    for layer in range(num_layers):
        w = weight[layer].astype(np.float64)
        node_of, rank_of = _pack_equal(w.reshape(num_groups, group_size).sum(1), num_nodes)
        node_major = np.empty(num_experts, np.int64)  # node-major position -> logical expert
        for g in range(num_groups):
            start = (node_of[g] * groups_per_node + rank_of[g]) * group_size
            node_major[start:start + group_size] = np.arange(g * group_size, (g + 1) * group_size)
        for node in range(num_nodes):
            experts = node_major[node * experts_per_node:(node + 1) * experts_per_node]
            load = w[experts]
            copies = np.ones(experts_per_node, np.int64)
            physical = list(range(experts_per_node))
            for _ in range(slots_per_node - experts_per_node):
                e = int(np.argmax(load / copies))
                physical.append(e)
                copies[e] += 1
            physical = np.array(physical)
            server, rank = _pack_equal(load[physical] / copies[physical], servers_per_node)
            out[layer, node * slots_per_node + server * slots_per_server + rank] = experts[physical]
    return out


# --- loads -----------------------------------------------------------------------------------------------

def drifting_zipf(num_windows: int, num_layers: int, num_experts: int, exponent: float, drift: float,
                  tokens: int, rng: np.random.Generator) -> np.ndarray:
    """[W, L, E] token counts: each layer's expert popularity is Zipf (rank ** -exponent, ranks shuffled per
    layer), its log takes a Gaussian random-walk step of `drift` per window, and a window's counts are
    Poisson around `tokens` x popularity."""
    rank = np.stack([rng.permutation(num_experts) + 1 for _ in range(num_layers)])
    log_pop = -exponent * np.log(rank)
    loads = np.empty((num_windows, num_layers, num_experts))
    for t in range(num_windows):
        if t:
            log_pop = log_pop + rng.normal(0.0, drift, log_pop.shape)
        pop = np.exp(log_pop - log_pop.max(1, keepdims=True))
        loads[t] = rng.poisson(tokens * pop / pop.sum(1, keepdims=True))
    return loads


def read_recorded(path: str) -> tuple[np.ndarray, dict]:
    """The loads [W, L, E] of a recorded file and its other fields (what recorded them)."""
    data = json.loads(Path(path).read_text())
    meta = {k: v for k, v in data.items() if k != "load"} if isinstance(data, dict) else {}
    loads = np.asarray(data["load"] if isinstance(data, dict) else data, dtype=np.float64)
    if loads.ndim != 3 or loads.shape[0] < 2:
        raise SystemExit(f"--recorded {path}: need {{\"load\": [windows][layers][experts]}} with >= 2 windows, "
                         f"got shape {loads.shape}")
    return loads, meta


def controller_view(loads: np.ndarray, windows: int, decay: float) -> np.ndarray:
    """[W, L, E] what the controller plans on at each window: the newest `windows` windows, each weighed
    decay**age (as `tandem.eplb.stats.read_load`)."""
    out = np.zeros_like(loads)
    for t in range(loads.shape[0]):
        for age in range(min(windows, t + 1)):
            out[t] += loads[t - age] * decay ** age
    return out


# --- running ---------------------------------------------------------------------------------------------

@dataclass
class Scenario:
    name: str
    loads: np.ndarray  # [W, L, E]
    shape: ClusterShape
    policy: str  # Tandem's policy for this scenario


def recorded_scenarios(loads: np.ndarray, servers: int, slots: int, nodes: list[int], groups: int,
                       policies: list[str]) -> list[Scenario]:
    """One scenario per (node count, policy) on the recorded loads; an impossible shape is an error."""
    scenarios = []
    for n in nodes:
        for policy in policies:
            try:
                shape = ClusterShape(servers, slots, n, groups)
                resolved = shape.resolve_policy(policy, loads.shape[2])
            except ValueError as e:
                raise SystemExit(f"--recorded with --nodes {n} --policy {policy}: {e}") from None
            name = f"recorded {n} node{'s' * (n > 1)} {resolved}"
            if all(s.name != name for s in scenarios):
                scenarios.append(Scenario(name, loads, shape, resolved))
    return scenarios


def run_method(scenario: Scenario, method: str, progress) -> dict:
    """Plan every window with one method; per-window means over layers and totals."""
    shape, k = scenario.shape, scenario.shape.slots_per_server
    previous, before, after, moved, seconds = None, [], [], [], []
    for t, load in enumerate(scenario.loads):
        start = time.perf_counter()
        if method == "deepseek":
            phy2log = deepseek_eplb(load, shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_servers)
        elif method in ("global", "hierarchical"):
            phy2log = plan_placement(load, shape, method).phy2log
        elif method == "static":
            phy2log = plan_placement(load, shape, scenario.policy).phy2log if previous is None else previous
        else:  # migration(m)
            margin = float(method[len("migration("):-1])
            phy2log = plan_placement(load, shape, scenario.policy, previous=previous, margin=margin).phy2log
        seconds.append(time.perf_counter() - start)
        if previous is not None:
            before.append(balancedness(load, previous, k))
            after.append(balancedness(load, phy2log, k))
            moved.append(count_moves(previous, phy2log, k))
        previous = phy2log
        progress.update(1)
    before, after, moved = np.array(before), np.array(after), np.array(moved)
    return {
        "balancedness_before": round(float(before.mean()), 5),
        "balancedness_after": round(float(after.mean()), 5),
        "balancedness_after_min": round(float(after.min()), 5),
        "moved_per_layer_per_replan": round(float(moved.mean()), 2),
        "moved_fraction_of_slots": round(float(moved.mean()) / shape.num_physical, 4),
        "seconds_per_plan": round(float(np.mean(seconds)), 3),
        "per_window": {"balancedness_before": before.mean(1).round(5).tolist(),
                       "balancedness_after": after.mean(1).round(5).tolist(),
                       "moved_per_layer": moved.mean(1).round(2).tolist()},
    }


def methods_for(scenario: Scenario, margins: list[float]) -> list[str]:
    shape = scenario.shape
    ours = ["global"] + (["hierarchical"] if shape.num_groups % shape.num_nodes == 0 else [])
    return ["deepseek", *ours, *(f"migration({m:g})" for m in margins), "static"]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    methods = list(dict.fromkeys(m for entry in results.values() for m in entry["methods"]))
    color = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}  # one colour per method everywhere
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False, constrained_layout=True)
    for col, name in enumerate(names):
        for method, r in results[name]["methods"].items():
            window = np.arange(1, len(r["per_window"]["balancedness_after"]) + 1)
            style = dict(color=color[method], linestyle="--" if method == "deepseek" else "-", label=method)
            axes[0, col].plot(window, r["per_window"]["balancedness_after"], **style)
            if method != "static":
                axes[1, col].plot(window, np.maximum(r["per_window"]["moved_per_layer"], 0.1), **style)
        axes[0, col].set_title(f"{name}\nbalancedness after re-plan (mean over layers)", fontsize=10)
        axes[1, col].set_title(f"{name}\nexperts moved per layer per re-plan", fontsize=10)
        axes[1, col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xlabel("window")
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true", help="short run: 8 layers, 12 windows")
    p.add_argument("--windows", type=int, default=50, help="windows of synthetic loads (default 50)")
    p.add_argument("--layers", type=int, default=58, help="MoE layers (default 58, DeepSeek-V3)")
    p.add_argument("--zipf", type=float, default=0.5, help="Zipf exponent of expert popularity (default 0.5)")
    p.add_argument("--drift", type=float, default=0.05, help="random-walk step of log popularity per window")
    p.add_argument("--tokens", type=int, default=1 << 20,
                   help="routed token-expert pairs per layer per window (default 2^20)")
    p.add_argument("--margins", default="0,0.002", help="margins of the migration-aware runs (default 0,0.002)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recorded", default=None, help='loads file {"load": [windows][layers][experts]}')
    p.add_argument("--servers", type=int, help="with --recorded: expert servers")
    p.add_argument("--slots-per-server", type=int, help="with --recorded: slots per server")
    p.add_argument("--nodes", default="1", help="with --recorded: nodes, or a comma-separated list of node "
                                                "counts, one scenario each (default 1)")
    p.add_argument("--groups", type=int, default=None,
                   help="with --recorded: expert groups (default the file's n_group, else 1)")
    p.add_argument("--policy", default="auto",
                   help="with --recorded: Tandem's policy for the migration-aware and static runs, auto, global "
                        "or hierarchical, or a comma-separated list, one scenario each (default auto)")
    p.add_argument("--smooth-windows", type=int, default=1,
                   help="plan on the decayed sum of the newest N windows, as the controller does (default 1: raw)")
    p.add_argument("--decay", type=float, default=1.0,
                   help="with --smooth-windows: weight of a window relative to the next newer one (default 1.0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = p.parse_args()
    from tqdm import tqdm

    margins = [float(m) for m in args.margins.split(",") if m.strip()]
    layers, windows = (8, 12) if args.quick else (args.layers, args.windows)
    rng = np.random.default_rng(args.seed)
    num_experts, num_groups = 256, 8
    scenarios, recorded_meta = [], None
    if args.recorded:
        if args.servers is None or args.slots_per_server is None:
            raise SystemExit("--recorded needs --servers and --slots-per-server")
        recorded, recorded_meta = read_recorded(args.recorded)
        try:
            nodes = [int(n) for n in args.nodes.split(",") if n.strip()]
        except ValueError:
            raise SystemExit(f"--nodes {args.nodes!r}: expected a node count or a comma-separated list") from None
        groups = args.groups or int(recorded_meta.get("n_group", 1))
        policies = [x.strip() for x in args.policy.split(",") if x.strip()]
        scenarios += recorded_scenarios(recorded, args.servers, args.slots_per_server, nodes, groups, policies)
    else:
        loads = drifting_zipf(windows, layers, num_experts, args.zipf, args.drift, args.tokens, rng)
        scenarios += [Scenario("prefill", loads, ClusterShape(32, 9, 4, num_groups), "hierarchical"),
                      Scenario("decode", loads, ClusterShape(320, 1, 40, num_groups), "global")]

    if args.smooth_windows < 1 or not 0 < args.decay <= 1:
        raise SystemExit(f"--smooth-windows must be >= 1 and --decay in (0, 1], got {args.smooth_windows} and "
                         f"{args.decay}")
    for s in scenarios:
        s.loads = controller_view(s.loads, args.smooth_windows, args.decay)

    results = {}
    total = sum(len(methods_for(s, margins)) * s.loads.shape[0] for s in scenarios)
    with tqdm(total=total, desc="planning", unit="plan", file=sys.stderr) as progress:
        for s in scenarios:
            shape = s.shape
            entry = {"shape": {"servers": shape.num_servers, "slots_per_server": shape.slots_per_server,
                               "nodes": shape.num_nodes, "groups": shape.num_groups,
                               "physical": shape.num_physical, "redundant": shape.num_physical - s.loads.shape[2]},
                     "policy": s.policy, "windows": s.loads.shape[0], "layers": s.loads.shape[1],
                     "experts": s.loads.shape[2], "methods": {}}
            for method in methods_for(s, margins):
                progress.set_postfix_str(f"{s.name} {method}")
                entry["methods"][method] = run_method(s, method, progress)
            base = entry["methods"]["deepseek"]
            for method, r in entry["methods"].items():
                if method.startswith("migration"):
                    r["vs_deepseek"] = {
                        "balancedness_after_diff": round(r["balancedness_after"] - base["balancedness_after"], 5),
                        "moved_ratio": round(r["moved_per_layer_per_replan"]
                                             / max(base["moved_per_layer_per_replan"], 1e-9), 4)}
            results[s.name] = entry

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"config": {"quick": args.quick, "zipf": args.zipf, "drift": args.drift, "tokens": args.tokens,
                         "seed": args.seed, "margins": margins,
                         "smooth_windows": args.smooth_windows, "decay": args.decay, "recorded": args.recorded,
                         "recorded_from": recorded_meta and {k: recorded_meta.get(k) for k in (
                             "model", "requests_per_window", "layer_ids", "new_tokens", "speculative_tokens")},
                         "machine": platform.platform(), "python": platform.python_version()},
              "scenarios": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    plot(results, args.out / "eplb.png")
    for name, entry in results.items():
        print(f"\n{name}: {entry['shape']}, policy {entry['policy']}, {entry['layers']} layers x "
              f"{entry['windows']} windows")
        print(f"  {'method':16} {'before':>8} {'after':>8} {'min':>8} {'moved/layer':>12} {'moved %':>8} {'s/plan':>7}")
        for method, r in entry["methods"].items():
            print(f"  {method:16} {r['balancedness_before']:8.4f} {r['balancedness_after']:8.4f} "
                  f"{r['balancedness_after_min']:8.4f} {r['moved_per_layer_per_replan']:12.2f} "
                  f"{100 * r['moved_fraction_of_slots']:7.1f}% {r['seconds_per_plan']:7.3f}")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'eplb.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
