"""Shared test helpers: small random DeepSeek-V3 checkpoints written by transformers, with MTP layers added.

transformers is the reference implementation the model tests compare against; it writes no MTP weights,
so `make_hf_checkpoint` adds random ones in DeepSeek's layout (layer `num_hidden_layers + k`).

Also a real `redis-server` for the integration tests: `redis_server` (one per session, its URL) and
`redis_process` (one per test, which the test may stop and restart); and `cpu_kernels`, the CPU kernels' library
built where engines build it, loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import torch

from tandem.cluster.launcher import free_port
from tandem.kernels import library
from tandem.model.checkpoint import SINGLE_FILE, Checkpoint, save_checkpoint
from tandem.model.config import ModelConfig
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM as TandemModel
from tandem.model.loading import export_state_dict

WEIGHT_STD = 0.2  # large enough that attention is far from uniform and routing far from a tie
BIAS_STD = 0.1  # e_score_correction_bias: changes which experts win, not their weights
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 0.707, "mscale_all_dim": 1.0}


def hf_config_kwargs(*, q_lora_rank: int | None, n_group: int, topk_group: int, first_k_dense_replace: int,
                     yarn: bool, num_mtp_layers: int) -> dict:
    """A tiny DeepSeek-V3: 3 layers, 8 routed experts (top-2) plus 1 shared, MLA with 4 heads."""
    return dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=q_lora_rank,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=n_group, topk_group=topk_group,
        first_k_dense_replace=first_k_dense_replace, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # no eos: generation never stops early
        rope_parameters=dict(YARN) if yarn else {"rope_type": "default", "rope_theta": 10000.0},
        num_mtp_layers=num_mtp_layers,
    )


def randomise_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter ~ N(0, WEIGHT_STD); RMSNorm scales ~ N(1, WEIGHT_STD) so they stay scales, and the
    router's correction bias ~ N(0, BIAS_STD)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for name, t in sorted(tensors.items()):
            if not t.is_floating_point() or "rotary" in name:
                continue
            noise = torch.randn(t.shape, generator=generator)
            if name.endswith("e_score_correction_bias"):
                t.copy_(noise * BIAS_STD)
            elif name.endswith("norm.weight") or "layernorm" in name:
                t.copy_(1 + noise * WEIGHT_STD)
            else:
                t.copy_(noise * WEIGHT_STD)


def make_hf_checkpoint(path: str | Path, *, q_lora_rank: int | None, n_group: int, topk_group: int,
                       first_k_dense_replace: int, yarn: bool, num_mtp_layers: int = 1, old_rope_config: bool = False,
                       rope_theta: float = 10000.0, seed: int = 0):
    """Write a random transformers DeepSeek-V3 checkpoint plus `num_mtp_layers` random MTP layers to `path`.

    `old_rope_config` rewrites config.json's RoPE settings in the form DeepSeek's own checkpoints use
    (top-level `rope_theta` + `rope_scaling = {"type": ...}`). Returns the transformers model (eval, float32).
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    path = Path(path)
    kwargs = hf_config_kwargs(q_lora_rank=q_lora_rank, n_group=n_group, topk_group=topk_group,
                              first_k_dense_replace=first_k_dense_replace, yarn=yarn, num_mtp_layers=num_mtp_layers)
    kwargs["rope_parameters"]["rope_theta"] = rope_theta
    generator = torch.Generator().manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs)).float().eval()
    randomise_(hf, generator)
    hf.save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    raw["num_nextn_predict_layers"] = num_mtp_layers
    if old_rope_config:
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        if params["rope_type"] == "yarn":
            params["type"] = params.pop("rope_type")
            raw["rope_scaling"] = params | {"beta_fast": 32, "beta_slow": 1}
    (path / "config.json").write_text(json.dumps(raw, indent=2))

    # MTP layers: random weights from a Tandem model of the same config, under DeepSeek's checkpoint names
    written = Checkpoint(path)
    hf_tensors = written.load_many(written.names())
    config = ModelConfig.from_file(path)
    mtp_model = TandemModel(config)
    randomise_(mtp_model, generator)
    N = config.num_hidden_layers
    mtp = {name: t for name, t in export_state_dict(mtp_model).items()
           if any(name.startswith(f"model.layers.{N + k}.") for k in range(num_mtp_layers))}
    for k in range(num_mtp_layers):  # DeepSeek stores copies of the main embedding and head in every MTP layer
        mtp[f"model.layers.{N + k}.embed_tokens.weight"] = hf_tensors["model.embed_tokens.weight"].clone()
        mtp[f"model.layers.{N + k}.shared_head.head.weight"] = hf_tensors["lm_head.weight"].clone()
    (path / SINGLE_FILE).unlink()
    config_json = (path / "config.json").read_text()
    save_checkpoint(path, config, hf_tensors | mtp)
    (path / "config.json").write_text(config_json)  # keep transformers' config.json, not Tandem's rewrite
    return hf


@dataclass(frozen=True)
class HFCheckpoint:
    path: Path
    hf_model: object  # transformers DeepseekV3ForCausalLM, eval, float32


@pytest.fixture(scope="session")
def cpu_kernels() -> Path:
    """The directory of the CPU kernels' library, built there (once per machine) and loaded in this process."""
    build_dir = library.default_build_dir()
    assert library.load(build_dir), "the CPU kernels must build wherever the tests run"
    return build_dir


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(**make_hf_checkpoint kwargs) -> HFCheckpoint, built once per parameter set per session.
    Tests must not modify the directory (copy it first)."""
    built: dict[tuple, HFCheckpoint] = {}

    def get(**params) -> HFCheckpoint:
        key = tuple(sorted(params.items()))
        if key not in built:
            path = tmp_path_factory.mktemp("hf_checkpoint")
            built[key] = HFCheckpoint(path, make_hf_checkpoint(path, **params))
        return built[key]

    return get


# --- a real redis-server for the integration tests -------------------------------------------------------


class RedisServer:
    """A `redis-server` process on 127.0.0.1:port, without persistence, that tests can stop and restart."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not on PATH: the integration tests need a real one. Run `make test` "
                        "(it installs it), or `apt-get install redis-server` yourself.", pytrace=False)
        self.workdir = workdir
        self.port = port or free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode} on port {self.port}")
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING on port {self.port} "
                                       f"within {timeout_s}s") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        """Kill the server (SIGKILL: no shutdown save, as in a crash) and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """URL of a redis-server shared by the whole session; tests keep apart by using their own key names."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_process(tmp_path):
    """A redis-server of this test alone, as a RedisServer (`.url`, `.stop()`, `.start()` on the same port)."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
