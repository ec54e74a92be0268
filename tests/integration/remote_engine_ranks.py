"""One rank of the expert-parallel engine test (test_remote_engine.py), run as its own process.

    python remote_engine_ranks.py CHECKPOINT RANK STORE_PORT OUT_DIR

Rank 0 is an attention worker running the engine with its routed experts on ranks 1 and 2, which load
only the experts of their slots from the checkpoint. Results go to OUT_DIR/rank{R}.pt.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.checkpoint import Checkpoint
from tandem.model.loading import load_model
from tandem.moe.placement import Placement
from tandem.transport import DataPlane, ExpertWorker, Roles, stop_expert_server
from tandem.transport.expert_parallel import load_server_experts, moe_layer_ids, use_remote_experts

ROLES = Roles(num_attention=1, num_expert_servers=2)
SLOTS_PER_SERVER = 5
PROMPTS = [[5, 9, 3, 11, 2], list(range(1, 18)), [7, 7, 7] + list(range(40, 60)), [42]]


def placement(num_layers: int, num_experts: int) -> Placement:
    """Every expert once, plus copies of experts 0 and 3 (10 slots on 2 servers)."""
    return Placement(torch.tensor([list(range(num_experts)) + [0, 3]] * num_layers), num_experts)


def attention(ckpt_dir: str, plane: DataPlane) -> dict:
    model = load_model(ckpt_dir, load_routed_experts=False)
    layers = moe_layer_ids(model.config)
    use_remote_experts(model, plane, placement(len(layers), model.config.n_routed_experts), SLOTS_PER_SERVER,
                       timeout_s=20)
    routed = {i: torch.zeros(model.config.n_routed_experts, dtype=torch.int64) for i in layers}
    for i in layers:
        model.model.layers[i].mlp.route_observer = lambda ids, i=i: routed[i].add_(
            torch.bincount(ids.flatten(), minlength=routed[i].numel()))
    engine = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False, block_size=4))
    remote = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=12))]
    colocated = Engine(load_model(ckpt_dir), EngineConfig(num_speculative_tokens=2, adaptive_speculation=False))
    expected = [c.token_ids for c in colocated.generate(PROMPTS, SamplingParams(max_tokens=12))]
    for server in range(ROLES.num_expert_servers):
        stop_expert_server(plane, ROLES.expert_rank(server))
    return {"remote": remote, "expected": expected, "routed": routed}


def expert_server(ckpt_dir: str, plane: DataPlane, server_idx: int) -> dict:
    ckpt = Checkpoint(ckpt_dir)
    layers = moe_layer_ids(ckpt.config)
    banks, phy2log = load_server_experts(ckpt, placement(len(layers), ckpt.config.n_routed_experts), server_idx,
                                         SLOTS_PER_SERVER, ckpt.config.num_nextn_predict_layers)
    counts = {i: torch.zeros(ckpt.config.n_routed_experts, dtype=torch.int64) for i in layers}
    worker = ExpertWorker(plane, banks, phy2log, ckpt.config.n_routed_experts,
                          on_tokens=lambda layer, c: counts[layer].add_(c))
    worker.serve_forever(threading.Event())
    return {"counts": counts, "loaded": sorted(ckpt.shards_opened), "num_slots": {i: b.num_slots for i, b in banks.items()}}


def main(ckpt_dir: str, rank: int, port: int, out_dir: str) -> None:
    plane = DataPlane.join("127.0.0.1", port, rank, ROLES.world_size, timeout_s=30, is_store_server=rank == 0,
                           roles=ROLES)
    try:
        result = attention(ckpt_dir, plane) if rank == 0 else expert_server(ckpt_dir, plane, rank - 1)
    finally:
        plane.close()
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
