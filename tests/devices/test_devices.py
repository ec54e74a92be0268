"""The model and engine on every device: the CUDA cases are what `scripts/gpu-check.sh` runs on a machine with
an NVIDIA GPU (skipped elsewhere, so CI runs the CPU cases only). The bundled checkpoint is stored in FP8
blocks, so every test also loads FP8 weights on its device.
"""

from pathlib import Path

import pytest
import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.attention_metadata import DenseCausal
from tandem.model.deepseek_v3 import latent_attention_dtype
from tandem.model.loading import load_model
from tandem.moe.experts import ExpertBank

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (scripts/gpu-check.sh runs these on one)")
DEVICES = [pytest.param(torch.device("cpu"), id="cpu"), pytest.param(torch.device("cuda"), id="cuda", marks=NEEDS_CUDA)]
CUDA = torch.device("cuda")

PROMPTS = [[0, 57, 1203, 88, 412, 9, 3071, 15] * 4, [0, 2048, 17, 17, 301], [0] + list(range(100, 160))]


@pytest.fixture(autouse=True, scope="module")
def exact_float32():
    """float32 matmuls in float32 (TF32 off), so that device and CPU agree to rounding."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def logits(model, prompt: list[int]) -> torch.Tensor:
    device = model.lm_head.weight.device
    ids = torch.tensor(prompt, device=device)
    with torch.inference_mode():
        hidden = model(ids, DenseCausal.for_batch(1, len(prompt), device))
        return model.logits(hidden).float().cpu()


def greedy(model, k: int, max_tokens: int = 24) -> tuple[list[list[int]], list]:
    engine = Engine(model, EngineConfig(max_num_seqs=4, num_speculative_tokens=k, adaptive_speculation=False,
                                        max_model_len=256, kv_cache_bytes=64 << 20))
    done = engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return [c.token_ids for c in done], [c.spec for c in done]


@pytest.fixture(scope="module")
def cpu_model():
    return load_model(MODEL, dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def float32_model():
    return load_model(MODEL, dtype=torch.float32, device=CUDA)


@NEEDS_CUDA
def test_float32_logits_match_the_cpu(cpu_model, float32_model):
    for prompt in PROMPTS:
        torch.testing.assert_close(logits(float32_model, prompt), logits(cpu_model, prompt), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_logits_pick_the_same_tokens_almost_everywhere(cpu_model, device):
    model = load_model(MODEL, dtype=torch.bfloat16, device=device)
    same = total = 0
    for prompt in PROMPTS:
        got, want = logits(model, prompt), logits(cpu_model, prompt)
        assert torch.isfinite(got).all()
        same += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(prompt)
    assert same >= 0.9 * total, f"bfloat16 picked the float32 token at {same} of {total} positions"


@NEEDS_CUDA
def test_float32_greedy_tokens_match_the_cpu_with_and_without_speculation(cpu_model, float32_model):
    want, _ = greedy(cpu_model, k=0)
    plain, _ = greedy(float32_model, k=0)
    assert plain == want
    for k in (1, 3):
        tokens, spec = greedy(float32_model, k)
        assert tokens == want, f"k={k}"
        assert sum(s.accepted_tokens for s in spec) > 0, f"k={k}: no draft was accepted"


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_speculative_decoding_runs_and_accepts_drafts(device):
    model = load_model(MODEL, dtype=torch.bfloat16, device=device)
    tokens, spec = greedy(model, k=2, max_tokens=32)
    assert [len(t) for t in tokens] == [32] * len(PROMPTS)
    assert sum(s.draft_tokens for s in spec) > 0
    assert sum(s.accepted_tokens for s in spec) > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_bank_matches_one_expert_at_a_time(dtype, device):
    torch.manual_seed(0)
    slots, hidden, inter, top_k, tokens = 8, 64, 32, 2, 40
    weights = {"gate_proj": torch.randn(slots, inter, hidden) / 8, "up_proj": torch.randn(slots, inter, hidden) / 8,
               "down_proj": torch.randn(slots, hidden, inter) / 6}
    bank = ExpertBank.from_weights({k: v.to(device, dtype) for k, v in weights.items()})
    x = torch.randn(tokens, hidden)
    chosen = torch.stack([torch.randperm(slots)[:top_k] for _ in range(tokens)])
    gates = torch.rand(tokens, top_k)
    want = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for slot, g in zip(chosen[t].tolist(), gates[t]):
            h = torch.nn.functional.silu(weights["gate_proj"][slot] @ x[t]) * (weights["up_proj"][slot] @ x[t])
            want[t] += g * (weights["down_proj"][slot] @ h)
    with torch.inference_mode():
        got = bank(x.to(device, dtype), chosen.to(device), gates.to(device)).float().cpu()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


@NEEDS_CUDA
def test_bfloat16_decode_steps_replay_from_cuda_graphs():
    """On the CPU the same padded steps are checked exactly (tests/unit/test_decode_graphs.py)."""
    model = load_model(MODEL, dtype=torch.bfloat16, device=CUDA)

    def run(cuda_graphs: bool, k: int) -> tuple[list[list[int]], Engine]:
        engine = Engine(model, EngineConfig(max_num_seqs=4, num_speculative_tokens=k, adaptive_speculation=False,
                                            max_model_len=256, kv_cache_bytes=64 << 20, cuda_graphs=cuda_graphs))
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 20, 28)]  # the batch shrinks
        return [c.token_ids for c in engine.generate(PROMPTS, params)], engine

    for k in (0, 2):
        eager, _ = run(False, k)
        graphed, engine = run(True, k)
        assert engine.graphs is not None and engine.graphs.num_replays > 0, "no step replayed from a graph"
        assert engine.graphs.num_graphs >= 3, "batch buckets 4, 2 and 1 each need a graph"
        # the MTP modules' catch-up and draft passes too
        assert [g.num_replays > 0 for g in engine.drafter.graphs] == [True] * k, "an MTP pass never replayed"
        # bfloat16 sums round differently in padded batches; a near tie may flip a token late in a sequence
        same_start = sum(a[:8] == b[:8] for a, b in zip(graphed, eager))
        assert same_start >= 2, f"k={k}: graphed {graphed} against eager {eager}"


def test_latent_attention_computes_in_float32_on_the_cpu_only():
    """bfloat16's small batched matmuls cost more than float32's on the CPU (see `latent_attention_dtype`)."""
    query = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert latent_attention_dtype(query) == torch.float32
    assert latent_attention_dtype(query.to("meta")) == torch.bfloat16
