"""The CPU kernels' library (`tandem.kernels.library`), and its layer operations (`tandem.kernels.layer_ops`)
against the tensor operations they replace, alone and in the bundled model's forward."""

import fcntl
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tandem.kernels import layer_ops, library, mla_decode
from tandem.model.attention_metadata import Paged
from tandem.model.config import ModelConfig
from tandem.model.deepseek_v3 import MLP, RMSNorm, RotaryEmbedding
from tandem.model.loading import load_model

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def tolerance(dtype: torch.dtype) -> dict:
    """The kernels round once where the tensor operations round after each: a unit or two in the last place."""
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -6, atol=2 ** -6),
            torch.float16: dict(rtol=2 ** -9, atol=2 ** -9)}[dtype]


def without_kernels(monkeypatch, fn):
    """fn() run as tensor operations."""
    with monkeypatch.context() as m:
        m.setattr(library, "_loaded", False)
        assert not layer_ops.applies(torch.zeros(1))
        return fn()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [256, 20])  # whole vectors of 16, and a partial one
def test_rms_norm_normalises_as_the_tensor_operations(monkeypatch, dtype, width):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(width).to(dtype)
    norm.weight.data = (1 + 0.3 * torch.randn(width, generator=g)).to(dtype)
    wide = (torch.randn(33, width + 16, generator=g) * 4).to(dtype)
    with torch.no_grad():
        # rows strided in memory; 3-d; columns strided (a transposed tensor)
        for x in (wide[:, :width], wide[:, :width].reshape(3, 11, width), wide[:, :width].t().contiguous().t()):
            assert layer_ops.applies(x)
            torch.testing.assert_close(norm(x), without_kernels(monkeypatch, lambda: norm(x)), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleave", [True, False])
def test_rope_rotates_as_the_tensor_operations(monkeypatch, dtype, interleave):
    config = ModelConfig.from_dict(dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4,
                                        qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=8, kv_lora_rank=16,
                                        rope_interleave=interleave, max_position_embeddings=64,
                                        model_type="deepseek_v3"))
    g = torch.Generator().manual_seed(1)
    tables = RotaryEmbedding(config)(torch.randint(0, 64, (9,), generator=g), dtype)
    q = torch.randn(9, 4, 24, generator=g).to(dtype)  # [T, H, N + R], as the query projection gives it
    kv = torch.randn(9, 32, generator=g).to(dtype)  # [T, C + R]
    q_pe, k_pe = q[..., 8:], kv[:, 16:]
    with torch.no_grad():
        rotated = tables.rotate_query_and_key(q_pe, k_pe)
        expected = without_kernels(monkeypatch, lambda: tables.rotate_query_and_key(q_pe, k_pe))
    for got, want in zip(rotated, expected):
        torch.testing.assert_close(got, want, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [128, 20])
@pytest.mark.parametrize("scaled", [False, True])
def test_silu_mul_is_swiglu_of_the_tensor_operations(dtype, width, scaled):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(50, 2 * width, generator=g) * 8).to(dtype)  # silu far into both tails
    gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0])
    gate, up = gate_up.chunk(2, dim=-1)
    scale = torch.rand(50, generator=g) if scaled else None
    expected = F.silu(gate.float()) * up.float() * (scale[:, None] if scaled else 1)
    torch.testing.assert_close(layer_ops.silu_mul(gate, up, scale).float(), expected, **tolerance(dtype))


def test_the_dense_mlp_runs_in_the_kernel_as_in_tensor_operations(monkeypatch):
    torch.manual_seed(3)
    mlp = MLP(32, 48).bfloat16()
    x = torch.randn(7, 32).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), without_kernels(monkeypatch, lambda: mlp(x)), rtol=0.02, atol=0.02)


def test_bad_inputs_get_clear_errors():
    x = torch.randn(4, 16)
    with pytest.raises(RuntimeError, match=r"weight must be \[16\] of x's dtype"):
        layer_ops.rms_norm(x, torch.ones(16, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="takes float32, bfloat16 or float16"):
        layer_ops.rms_norm(x.double(), torch.ones(16, dtype=torch.float64), 1e-6)
    with pytest.raises(RuntimeError, match=r"cos and sin must be contiguous \[4, 4\]"):
        layer_ops.rope(x.view(4, 2, 8), torch.ones(4, 8), torch.ones(4, 8), True)
    with pytest.raises(RuntimeError, match="even R"):
        layer_ops.rope(x[:, :15].reshape(4, 3, 5), torch.ones(4, 2), torch.ones(4, 2), True)
    with pytest.raises(RuntimeError, match="gate and up must have one shape and dtype"):
        layer_ops.silu_mul(x, x[:, :8])
    with pytest.raises(RuntimeError, match=r"one value per row \(4\)"):
        layer_ops.silu_mul(x, x, torch.ones(3))
    with pytest.raises(RuntimeError, match="contiguous rows"):
        layer_ops.silu_mul(x.t(), x.t())


def test_training_and_compilers_keep_the_tensor_operations():
    """They need gradients, or fuse the operations themselves."""
    norm = RMSNorm(16)
    x = torch.randn(4, 16, requires_grad=True)
    assert not layer_ops.applies(x) and layer_ops.applies(x.detach())
    with torch.no_grad():
        assert layer_ops.applies(x)
    norm(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not layer_ops.applies(x.detach(), norm.weight)  # a trained weight wants its gradient too
    norm(x.detach()).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    seen = []
    torch.compile(lambda t: seen.append(layer_ops.applies(t)) or t + 1, backend="eager", fullgraph=False)(x.detach())
    assert seen == [False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefill_and_a_decode_step_of_the_bundled_model_match_the_tensor_operations(monkeypatch, dtype):
    """The whole forward, eager, every layer operation in the kernels or none: prompts' first chunks (which run
    the dense MLP, the experts' grouped path and prompt attention), then a decode step over the cache."""
    model = load_model(MODEL, dtype=dtype)
    config = model.config
    g = torch.Generator().manual_seed(4)
    lens, block_size = [5, 12, 12], 16
    tables = [[0], [1], [2]]
    ids = torch.randint(2, config.vocab_size, (sum(lens),), generator=g)

    def forward():
        cache = torch.zeros(config.num_kv_layers, 4 * block_size, config.kv_cache_dim, dtype=dtype)
        prefill = Paged.build(query_lens=lens, context_lens=lens, block_tables=tables, block_size=block_size,
                              kv_cache=cache)
        hidden = model(ids, prefill)
        step = Paged.build(query_lens=[1, 1, 1], context_lens=[n + 1 for n in lens], block_tables=tables,
                           block_size=block_size, kv_cache=cache)
        return model.logits(hidden), model.logits(model(ids[:3], step))

    with torch.no_grad():
        in_kernels = forward()
        in_tensor_ops = without_kernels(monkeypatch, forward)
    for got, want in zip(in_kernels, in_tensor_ops):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:  # bfloat16 roundings drift through the layers; the tokens the logits pick do not
            assert (got.float().argmax(-1) == want.float().argmax(-1)).float().mean() >= 0.9
            assert (got.float() - want.float()).abs().mean() < 0.05 * want.float().abs().mean()


def test_a_library_that_cannot_be_built_leaves_the_model_to_tensor_operations(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(library, "_loaded", None)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    assert not library.load(tmp_path / "kernels")
    assert "could not be built" in caplog.text and not library.loaded()
    assert not mla_decode.supports(8, 64) and not layer_ops.applies(torch.zeros(1))


def test_a_built_library_is_found_again_not_rebuilt(build_dir):
    built = library._build(build_dir)
    built_at = built.stat().st_mtime_ns
    assert library._build(build_dir) == built and built.stat().st_mtime_ns == built_at
    assert built in build_dir.glob("*.so")


def test_a_build_in_progress_is_waited_for_not_repeated(tmp_path):
    """Processes starting together on a fresh machine: the second waits for the first's build and loads it."""
    tmp_path.mkdir(exist_ok=True)
    built = library.library_path(tmp_path)
    result = []
    with open(tmp_path / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build in progress
        waiter = threading.Thread(target=lambda: result.append(library._build(tmp_path)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and not result
        built.write_bytes(b"the first process's build")
    waiter.join(10)
    assert result == [built] and built.read_bytes() == b"the first process's build"
