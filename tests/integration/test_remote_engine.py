"""The engine with its routed experts on two expert-server processes (real gloo) produces exactly the
colocated engine's greedy tokens, MTP speculation included, and the servers count every routed token."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tandem.model.checkpoint import save_checkpoint
from tandem.model.config import ModelConfig
from tandem.model.loading import export_state_dict
from tandem.model.presets import random_model
from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("remote_engine_ranks.py")


def test_expert_parallel_engine_matches_colocated(tmp_path):
    config = ModelConfig(vocab_size=80, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                         kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
                         n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                         max_position_embeddings=256, num_nextn_predict_layers=1)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, config, export_state_dict(random_model(config, seed=3, std=0.3)),
                    max_shard_bytes=20_000)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "libs"), os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(ckpt), str(r), str(port), str(tmp_path)], env=env,
                              stderr=open(tmp_path / f"rank{r}.log", "w")) for r in range(3)]
    try:
        for r, p in enumerate(procs):
            assert p.wait(timeout=120) == 0, (tmp_path / f"rank{r}.log").read_text()[-3000:]
    finally:
        for p in procs:
            p.kill()
    attention = torch.load(tmp_path / "rank0.pt")
    servers = [torch.load(tmp_path / f"rank{r}.pt") for r in (1, 2)]
    assert attention["remote"] == attention["expected"]
    for layer, routed in attention["routed"].items():
        assert torch.equal(servers[0]["counts"][layer] + servers[1]["counts"][layer], routed), layer
        assert routed.sum() > 0
    assert all(n == 5 for s in servers for n in s["num_slots"].values())
    # each server read only some shards: the other server's experts are not loaded
    assert all(len(s["loaded"]) < len(list(ckpt.glob("*.safetensors"))) for s in servers)
