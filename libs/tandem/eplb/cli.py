"""`tandem eplb`: plan expert placements offline, look at live expert-load statistics, and re-plan a running
cluster.

    tandem eplb plan --load LOAD.json --servers 32 --slots-per-server 9 --nodes 4 --groups 8 [--json]
    tandem eplb show --redis-url redis://host:6379/0 --model NAME --servers 32 --slots-per-server 9 [--plot F.png]
    tandem eplb rebalance --controller HOST:PORT [--force] [--json]

LOAD.json is {"load": [[tokens per logical expert] per MoE layer]}; `plan --json` writes
{"phy2log", "logcnt", "balancedness", "moved"}, which --previous reads back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from tandem.cluster.placement_store import static_phy2log
from tandem.eplb.planner import (DEFAULT_MARGIN, POLICIES, ClusterShape, Plan, balancedness, plan_placement,
                                 server_loads)


class EplbInputError(ValueError):
    """Bad input named for the user: exit code 2."""


def add_eplb_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eplb plan`, `eplb show` (both dispatch to `run_eplb`) and `eplb rebalance` (`run_rebalance`) to the
    `tandem` subcommands."""
    eplb = subparsers.add_parser("eplb", help="plan expert placements (redundant experts), show expert load, "
                                              "re-plan a running cluster",
                                 description="Expert-parallel load balancing: plan which expert servers hold "
                                             "which experts, show the balance of live statistics, and have a "
                                             "running cluster's controller re-plan now.")
    sub = eplb.add_subparsers(dest="eplb_command", required=True, metavar="EPLB_COMMAND")

    plan = sub.add_parser("plan", help="plan a placement from a load file",
                          description="Plan every MoE layer's placement from per-expert loads and print a "
                                      "summary, or the plan as JSON with --json.")
    plan.add_argument("--load", required=True, help='JSON file {"load": [[tokens per expert] per layer]}')
    _add_shape_flags(plan)
    plan.add_argument("--json", action="store_true", help="write the plan as JSON to stdout")
    plan.set_defaults(func=run_eplb)

    show = sub.add_parser("show", help="balancedness of live statistics in Redis, now and as planned",
                          description="Read the expert-load statistics the expert servers write to Redis and "
                                      "print each layer's balancedness under the current placement (static, "
                                      "or --previous) and under the planned one.")
    show.add_argument("--redis-url", required=True, help="e.g. redis://127.0.0.1:6379/0")
    show.add_argument("--model", required=True, help="served model name (the statistics' key prefix)")
    show.add_argument("--windows", type=int, default=6, help="newest statistics windows to read (default 6)")
    show.add_argument("--decay", type=float, default=1.0,
                      help="weight per window of age, in (0, 1] (default 1: plain sum)")
    show.add_argument("--num-layers", type=int, default=None, help="MoE layers (default: from the statistics)")
    show.add_argument("--num-experts", type=int, default=None,
                      help="routed experts per layer (default: from the statistics)")
    _add_shape_flags(show)
    show.add_argument("--plot", default=None, help="write a server-by-layer load heatmap, now vs planned (PNG)")
    show.set_defaults(func=run_eplb)

    rebalance = sub.add_parser("rebalance", help="re-plan a running cluster's expert placement now",
                               description="Ask the controller to re-plan the expert placement from the live "
                                           "statistics now (as its periodic re-plan does) and apply it if it pays: "
                                           "the expert servers load the new experts beside the old ones, the new "
                                           "placement version is published and the workers switch to it. Prints "
                                           "the outcome; exit code 0 whether or not a new placement was applied, "
                                           "1 when the controller could not be asked or refused (e.g. load "
                                           "balancing off: the controller has no --redis-url).")
    rebalance.add_argument("--controller", required=True, metavar="HOST:PORT", help="the controller's gRPC address")
    rebalance.add_argument("--force", action="store_true",
                           help="apply the plan even if it gains less than the controller's rebalance_min_gain "
                                "(it must still move an expert)")
    rebalance.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    rebalance.add_argument("--timeout-s", type=float, default=300.0,
                           help="how long to wait for the outcome; staging on the expert servers and the workers' "
                                "switch take up to the controller's stage_timeout_s + ack_timeout_s (default 300)")
    rebalance.set_defaults(func=run_rebalance)
    return eplb


def _add_shape_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--servers", type=int, required=True, help="expert servers")
    p.add_argument("--slots-per-server", type=int, required=True, help="physical expert slots per server")
    p.add_argument("--nodes", type=int, default=1, help="nodes the servers are spread over evenly (default 1)")
    p.add_argument("--groups", type=int, default=1, help="expert groups of the router, n_group (default 1)")
    p.add_argument("--policy", choices=POLICIES, default="auto",
                   help="auto (default: hierarchical when groups %% nodes == 0), global or hierarchical")
    p.add_argument("--previous", default=None,
                   help="plan JSON now serving (as `plan --json` writes): re-plan moving few experts")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="with --previous: fraction of the worst server's load a change must save for each "
                        f"expert it moves (default {DEFAULT_MARGIN})")


def run_eplb(args: argparse.Namespace) -> int:
    """Run `eplb plan` or `eplb show`. Returns the exit code: 0 done, 2 bad input, 1 Redis unavailable or
    nothing recorded. Errors are one line on stderr, never a traceback."""
    command = f"tandem eplb {args.eplb_command}"
    try:
        if args.eplb_command == "plan":
            return _plan(args)
        return _show(args, command)
    except ValueError as e:  # EplbInputError and the planner's checks
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing --plot
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2


# --- plan ------------------------------------------------------------------------------------------------

def _plan(args: argparse.Namespace) -> int:
    load = _read_json_field(args.load, "--load", "load")
    plan = _make_plan(load, _read_previous(args), args)
    if args.json:
        json.dump(plan.to_json(), sys.stdout)
        sys.stdout.write("\n")
        return 0
    shape = _shape(args)
    num_physical = shape.num_physical
    print(f"policy {plan.policy}: {plan.num_layers} MoE layers x {plan.num_logical} experts on {shape.num_servers} "
          f"servers x {shape.slots_per_server} slots ({num_physical} physical, "
          f"{num_physical - plan.num_logical} redundant) over {shape.num_nodes} node(s)")
    print("layer  balancedness  moved  most copies")
    logcnt = plan.logcnt
    for layer in range(plan.num_layers):
        top = np.argsort(-logcnt[layer], kind="stable")[:4]
        copies = ", ".join(f"{e}x{logcnt[layer, e]}" for e in top if logcnt[layer, e] > 1) or "-"
        moved = str(plan.moved[layer]) if args.previous else "-"
        print(f"{layer:5d}  {plan.balancedness[layer]:12.4f}  {moved:>5}  {copies}")
    total = f"{int(plan.moved.sum()):5d}  (total moved)" if args.previous else "    -"
    print(f" mean  {plan.balancedness.mean():12.4f}  {total}")
    return 0


def _shape(args: argparse.Namespace) -> ClusterShape:
    return ClusterShape(args.servers, args.slots_per_server, args.nodes, args.groups)


def _read_previous(args: argparse.Namespace):
    return None if args.previous is None else _read_json_field(args.previous, "--previous", "phy2log")


def _make_plan(load, previous, args: argparse.Namespace) -> Plan:
    try:
        return plan_placement(load, _shape(args), args.policy, previous=previous, margin=args.margin)
    except ValueError as e:
        raise EplbInputError(str(e)) from None


def _read_json_field(path: str, flag: str, field: str):
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise EplbInputError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EplbInputError(f"{flag} {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or field not in data:
        raise EplbInputError(f'{flag} {path}: expected a JSON object with "{field}"')
    return data[field]


# --- rebalance -------------------------------------------------------------------------------------------

def run_rebalance(args: argparse.Namespace) -> int:
    """`eplb rebalance`: the Rebalance RPC. 0 when the controller answered (applied or not), 1 on a gRPC error
    (one line on stderr with the status and the controller's message)."""
    import grpc

    from tandem.v1 import controller_pb2 as pb
    from tandem.v1 import controller_pb2_grpc as pb_grpc

    command = "tandem eplb rebalance"
    if args.timeout_s <= 0:
        print(f"{command}: error: --timeout-s must be positive, got {args.timeout_s}", file=sys.stderr)
        return 2
    try:
        with grpc.insecure_channel(args.controller) as channel:
            reply = pb_grpc.ControllerStub(channel).Rebalance(pb.RebalanceRequest(force=args.force),
                                                              timeout=args.timeout_s)
    except grpc.RpcError as e:
        print(f"{command}: error: controller {args.controller}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    outcome = {"applied": reply.applied, "reason": reply.reason, "placement_version": reply.placement_version,
               "balancedness_before": reply.balancedness_before, "balancedness_after": reply.balancedness_after,
               "moved": reply.num_moved_experts}
    if args.json:
        print(json.dumps(outcome))
        return 0
    print(format_rebalance(outcome))
    return 0


def format_rebalance(o: dict) -> str:
    """The outcome of a re-plan, in a line or two."""
    if o["applied"]:
        head = f"applied: placement version {o['placement_version']} now serving"
    else:
        head = f"not applied ({o['reason']}): placement version {o['placement_version']} keeps serving"
    if o["balancedness_before"] == 0 and o["balancedness_after"] == 0:  # nothing was planned
        return head
    verb = "moved" if o["applied"] else "to move"
    return (f"{head}\n  balancedness {o['balancedness_before']:.4f} -> {o['balancedness_after']:.4f} "
            f"(mean over MoE layers), {o['moved']} experts {verb}")


# --- show ------------------------------------------------------------------------------------------------

def _show(args: argparse.Namespace, command: str) -> int:
    import redis

    from tandem.eplb import stats

    if args.windows < 1 or not 0 < args.decay <= 1:
        raise EplbInputError(f"--windows must be >= 1 and --decay in (0, 1], got {args.windows} and {args.decay}")
    client = stats.connect(args.redis_url)
    try:
        num_layers, num_experts = _stats_extent(client, args)
        if num_layers == 0:
            print(f"{command}: no expert-load statistics for model {args.model!r} at {args.redis_url}",
                  file=sys.stderr)
            return 1
        load = stats.read_load(client, args.model, num_layers, num_experts, args.windows, args.decay).numpy()
    except redis.RedisError as e:
        print(f"{command}: error: Redis at {args.redis_url} is unavailable: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    previous = _read_previous(args)
    plan = _make_plan(load, previous, args)  # checks `previous` against the loads and shape
    shape = _shape(args)
    if previous is None:  # what the controller serves before its first re-plan
        previous = static_phy2log(*load.shape, shape.num_servers, shape.slots_per_server).numpy()
        current = "static"
    else:
        current = "previous"
    previous = np.asarray(previous, dtype=np.int64)
    now = server_loads(load, previous, shape.slots_per_server)
    now_balance = balancedness(load, previous, shape.slots_per_server)
    print(f"model {args.model}: {num_layers} MoE layers x {num_experts} experts, {int(load.sum())} tokens "
          f"(newest {args.windows} windows, decay {args.decay}); {shape.num_servers} servers x "
          f"{shape.slots_per_server} slots, policy {plan.policy}")
    print(f"layer  {current:>8}  planned  moved")
    for layer in range(num_layers):
        moved = str(plan.moved[layer]) if args.previous else "-"
        print(f"{layer:5d}  {now_balance[layer]:8.4f}  {plan.balancedness[layer]:7.4f}  {moved:>5}")
    print(f" mean  {now_balance.mean():8.4f}  {plan.balancedness.mean():7.4f}")
    if args.plot:
        plot_heatmaps(now, plan.server_load, args.plot, titles=(f"now ({current})", f"planned ({plan.policy})"))
        print(f"wrote {args.plot}")
    return 0


def _stats_extent(client, args: argparse.Namespace) -> tuple[int, int]:
    """(layers, experts) to read: the flags, else one more than the largest ids in the windows read."""
    from tandem.eplb import stats

    if args.num_layers is not None and args.num_experts is not None:
        if args.num_layers < 1 or args.num_experts < 1:
            raise EplbInputError("--num-layers and --num-experts must be >= 1")
        return args.num_layers, args.num_experts
    newest = client.zrevrange(stats.windows_key(args.model), 0, args.windows - 1)
    pipe = client.pipeline(transaction=False)
    for window in newest:
        pipe.hkeys(stats.window_key(args.model, int(window)))
    layers, experts = 0, 0
    for fields in pipe.execute():
        for field in fields:
            layer, expert = (int(x) for x in (field.decode() if isinstance(field, bytes) else field).split(":"))
            layers, experts = max(layers, layer + 1), max(experts, expert + 1)
    return args.num_layers or layers, args.num_experts or experts


def plot_heatmaps(before: np.ndarray, after: np.ndarray, path: str, titles: tuple[str, str]) -> None:
    """Two server-by-layer heatmaps of load / the layer's mean server load, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def relative(x: np.ndarray) -> np.ndarray:
        mean = x.mean(1, keepdims=True)
        return np.divide(x, mean, out=np.ones_like(x), where=mean > 0)

    panels = [relative(before), relative(after)]
    top = max(2.0, max(float(p.max()) for p in panels))
    norm = matplotlib.colors.TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)  # white = the mean
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    for ax, data, title in zip(axes, panels, titles):
        image = ax.imshow(data.T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm, interpolation="nearest")
        balance = np.mean(1 / np.maximum(data.max(1), 1e-12))
        ax.set_title(f"{title}: mean balancedness {balance:.3f}")
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("expert server")
    fig.colorbar(image, ax=axes, label="server load / mean server load")
    fig.savefig(path, dpi=100)
    plt.close(fig)
