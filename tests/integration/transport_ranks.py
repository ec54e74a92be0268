"""One rank of a data-plane test world, run as its own process by test_transport.py.

    python transport_ranks.py SCENARIO RANK WORLD_SIZE STORE_PORT OUT_DIR

Every rank rebuilds the same expert weights from fixed seeds. Ranks write what they saw to
OUT_DIR/rank{R}.pt (a dict) for the test to check; the test drives the "dead" scenario through files in
OUT_DIR (it kills and stops ranks between phases).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path

import torch

from tandem.engine.kv_cache import BlockAllocator, gather_kv, scatter_kv
from tandem.moe.experts import ExpertBank, LocalExperts
from tandem.moe.placement import Placement
from tandem.transport import (DataPlane, ExpertWorker, RemoteExperts, Roles, TransportError, recv_kv, send_kv,
                              stop_expert_server)

E, D, I, K = 8, 32, 16, 3  # logical experts, hidden, expert intermediate, active experts per token
NUM_SERVERS = 2
# MoE layer -> phy2log of its physical slots; half of the slots on each of the two servers.
# Layers 3 and 4 replicate experts 0 and 4 on both servers (they hold the same weights as layers 1 and 2).
PHY2LOG = {1: list(range(8)), 2: list(range(8)),
           3: [0, 1, 2, 3, 4, 5, 6, 7, 0, 4], 4: [0, 1, 2, 3, 4, 5, 6, 7, 0, 4]}
TIMEOUT_S = 1.0  # expert calls in the dead-server scenario
SCENARIOS = {"single": Roles(1, NUM_SERVERS), "pair": Roles(2, NUM_SERVERS), "kv": Roles(2, 0),
             "dead": Roles(1, NUM_SERVERS)}


def logical_weights(layer: int) -> dict[str, torch.Tensor]:
    """The E logical experts of a layer (layers 3 and 4 reuse 1 and 2)."""
    g = torch.Generator().manual_seed(1000 + (layer - 1) % 2)
    return {"gate_proj": torch.randn(E, I, D, generator=g) * 0.2, "up_proj": torch.randn(E, I, D, generator=g) * 0.2,
            "down_proj": torch.randn(E, D, I, generator=g) * 0.2}


def make_bank(layer: int, experts: list[int]) -> ExpertBank:
    bank = ExpertBank(len(experts), D, I)
    with torch.no_grad():
        for name, w in logical_weights(layer).items():
            getattr(bank, name).copy_(w[experts])
    return bank


def slots_per_server(layer: int) -> int:
    return len(PHY2LOG[layer]) // NUM_SERVERS


def local_reference(layer: int) -> LocalExperts:
    """The colocated reference: every logical expert once, in one bank."""
    return LocalExperts(make_bank(layer, list(range(E))), Placement.identity(1, E).layer_table(0))


def remote(plane: DataPlane, layer: int, timeout_s: float = 10.0) -> RemoteExperts:
    table = Placement(torch.tensor([PHY2LOG[layer]]), E).layer_table(0)
    return RemoteExperts(plane, layer, table, slots_per_server(layer), timeout_s)


def random_routing(num_tokens: int, g: torch.Generator, experts: int = E):
    x = torch.randn(num_tokens, D, generator=g)
    ids = torch.rand(num_tokens, experts, generator=g).argsort(dim=1)[:, :K]
    weights = torch.rand(num_tokens, K, generator=g)
    return x, ids, weights


def run_server(plane: DataPlane, server_idx: int) -> dict:
    banks, phy2log = {}, {}
    for layer, table in PHY2LOG.items():
        n = slots_per_server(layer)
        mine = table[server_idx * n:(server_idx + 1) * n]
        banks[layer], phy2log[layer] = make_bank(layer, mine), torch.tensor(mine)
    counts = {layer: torch.zeros(E, dtype=torch.int64) for layer in PHY2LOG}

    def on_tokens(layer: int, c: torch.Tensor) -> None:
        counts[layer] += c

    worker = ExpertWorker(plane, banks, phy2log, E, on_tokens)
    worker.serve_forever(threading.Event())
    return {"counts": counts, "num_served": worker.num_served, "failed_peers": worker.failed_peers}


def check_experts(plane: DataPlane, seed: int) -> dict:
    """Remote vs local on every layer, several batch sizes, plus two micro-batches in flight at once."""
    g = torch.Generator().manual_seed(seed)
    max_err, routed = 0.0, {layer: torch.zeros(E, dtype=torch.int64) for layer in PHY2LOG}
    for layer in PHY2LOG:
        ref, rem = local_reference(layer), remote(plane, layer)
        for num_tokens in (1, 7, 64):
            x, ids, w = random_routing(num_tokens, g)
            max_err = max(max_err, (rem(x, ids, w) - ref(x, ids, w)).abs().max().item())
            routed[layer] += torch.bincount(ids.flatten(), minlength=E)
        batches = [random_routing(16, g) for _ in range(2)]
        in_flight = [rem.dispatch(*b) for b in batches]
        for b, f in reversed(list(zip(batches, in_flight))):  # waited out of order
            max_err = max(max_err, (f.wait() - ref(*b)).abs().max().item())
            routed[layer] += torch.bincount(b[1].flatten(), minlength=E)
    return {"max_err": max_err, "routed": routed}


def scenario_experts(plane: DataPlane, roles: Roles) -> dict:
    if roles.is_expert_server(plane.rank):
        return run_server(plane, plane.rank - roles.num_attention)
    result = check_experts(plane, seed=plane.rank)
    for s in range(roles.num_expert_servers):  # a server returns once every attention rank has said so
        stop_expert_server(plane, roles.expert_rank(s))
    return result


def scenario_kv(plane: DataPlane) -> dict:
    L, C, block_size, num_blocks = 3, 24, 4, 16
    g = torch.Generator().manual_seed(7)
    source = torch.randn(L, num_blocks * block_size, C, generator=g)
    src_table, num_tokens = [5, 2, 9, 11], 14
    expected = [gather_kv(source, src_table, num_tokens, block_size), torch.randn(L, 5, C, generator=g).bfloat16()]
    if plane.rank == 0:
        send_kv(plane, 1, 42, gather_kv(source, src_table, num_tokens, block_size), timeout_s=10)
        send_kv(plane, 1, 43, expected[1], timeout_s=10)
        return {}
    cache = torch.zeros(L, num_blocks * block_size, C)
    allocator = BlockAllocator(num_blocks)
    allocator.allocate(3)  # so this sequence's block ids differ from the sender's
    table = allocator.allocate(4)
    first = recv_kv(plane, None, timeout_s=10)
    scatter_kv(cache, table, first[1], block_size)
    second = recv_kv(plane, 0, timeout_s=10)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[torch.tensor([b * block_size + i for b in table for i in range(block_size)][:num_tokens])] = False
    return {"ids": [first[0], second[0]], "table": table,
            "err": (gather_kv(cache, table, num_tokens, block_size) - expected[0]).abs().max().item(),
            "second_equal": bool(torch.equal(second[1], expected[1])), "second_dtype": str(second[1].dtype),
            "untouched_zero": bool((cache[:, untouched] == 0).all())}


def wait_for_file(path: Path, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"the test never wrote {path.name}")
        time.sleep(0.02)


def timed_failure(call) -> dict:
    start = time.monotonic()
    try:
        call()
    except TransportError as e:
        return {"raised": True, "elapsed": time.monotonic() - start, "message": str(e)}
    return {"raised": False, "elapsed": time.monotonic() - start, "message": ""}


def scenario_dead(plane: DataPlane, roles: Roles, out_dir: Path) -> dict:
    """Kill server rank 2 (connection closes), then SIGSTOP server rank 1 (it never answers)."""
    if roles.is_expert_server(plane.rank):
        return run_server(plane, plane.rank - roles.num_attention)
    g = torch.Generator().manual_seed(3)
    rem = remote(plane, 1, timeout_s=TIMEOUT_S)
    rem(*random_routing(8, g))  # both servers answer
    (out_dir / "phase1").touch()
    wait_for_file(out_dir / "killed")
    time.sleep(0.2)  # let gloo see the closed connection, so that posting to rank 2 already fails
    killed = timed_failure(lambda: rem(*random_routing(8, g)))
    x, ids, w = random_routing(8, g, experts=4)  # experts 0-3 only: the surviving server
    survivor_err = (rem(x, ids, w) - local_reference(1)(x, ids, w)).abs().max().item()
    (out_dir / "phase2").touch()
    wait_for_file(out_dir / "stopped")
    silent = timed_failure(lambda: rem(*random_routing(8, g, experts=4)))
    return {"killed": killed, "survivor_err": survivor_err, "silent": silent}


def main() -> None:
    scenario, rank, world_size, port, out_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
        Path(sys.argv[5])
    roles = SCENARIOS[scenario]
    torch.set_num_threads(1)
    try:
        plane = DataPlane.join("127.0.0.1", port, rank, world_size, backend="gloo", timeout_s=20,
                               is_store_server=rank == 0, roles=roles)
        if scenario == "kv":
            result = scenario_kv(plane)
        elif scenario == "dead":
            result = scenario_dead(plane, roles, out_dir)
        else:
            result = scenario_experts(plane, roles)
    except Exception:
        result = {"error": traceback.format_exc()}
    torch.save(result, out_dir / f"rank{rank}.pt")
    if "error" not in result and scenario != "dead":
        # rank 0 hosts the store: it stays until every rank is done with it
        done = plane.store.add("transport_test/finished", 1)
        end = time.monotonic() + 20
        while rank == 0 and done < world_size and time.monotonic() < end:
            time.sleep(0.02)
            done = plane.store.add("transport_test/finished", 0)
    # no plane.close(): ranks finish at different times, and tearing down groups would wait on the others


if __name__ == "__main__":
    main()
