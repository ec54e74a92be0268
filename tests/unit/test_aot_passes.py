"""Decode passes compiled ahead of time (`tandem.engine.aot_passes`): one library per shape class, reading the
model's own weights, cached on disk. tests/unit/test_decode_graphs.py runs whole engines on them."""

from pathlib import Path

import pytest
import torch

from tandem.engine.aot_passes import (CACHE_ENV, AOTPasses, FlatPass, ShapeClass, packs_weights, shape_classes,
                                      writable_cache_dir)
from tandem.engine.decode_graphs import DecodeGraphs
from tandem.engine.engine import Engine, EngineConfig
from tandem.kernels import library
from tandem.kernels.tiles import pack_model_
from tandem.model.attention_metadata import Paged, PagedStep
from tandem.model.loading import load_model

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, dtype=torch.float32)


def test_shape_classes_split_the_batches_where_the_experts_change_path(model, monkeypatch):
    """Without the CPU kernels, the bundled model's 16 experts, 4 per token, gather their weights for up to 4
    tokens and run densely beyond: a library serves batches on one side of that, and batch 1 alone."""
    monkeypatch.setattr(library, "_loaded", False)
    assert model.model.layers[1].mlp.experts.bank.max_gathered_tokens(4) == 4
    assert shape_classes(model, 32, 1) == [ShapeClass(1, 1, 1), ShapeClass(1, 2, 4), ShapeClass(1, 5, 32)]
    assert shape_classes(model, 32, 2) == [ShapeClass(2, 1, 1), ShapeClass(2, 2, 2), ShapeClass(2, 3, 32)]
    assert shape_classes(model, 32, 3) == [ShapeClass(3, 1, 1), ShapeClass(3, 2, 32)]
    assert shape_classes(model, 3, 1) == [ShapeClass(1, 1, 1), ShapeClass(1, 2, 3)]
    assert shape_classes(model, 1, 1) == [ShapeClass(1, 1, 1)]
    for query_len in (1, 2, 3, 5):
        classes = shape_classes(model, 64, query_len)
        assert [b for c in classes for b in range(c.min_batch, c.max_batch + 1)] == list(range(1, 65))
        for c in classes:
            assert len({b * query_len <= 4 for b in range(c.min_batch, c.max_batch + 1)}) == 1


def test_experts_the_cpu_kernel_runs_split_no_shape_class(model, cpu_kernels):
    """The kernel runs the experts the same way for any number of tokens: batch 1, then every other batch."""
    pack_model_(model)  # as a CPU engine does
    assert model.model.layers[1].mlp.experts.bank.max_gathered_tokens(4) is None
    assert shape_classes(model, 32, 1) == [ShapeClass(1, 1, 1), ShapeClass(1, 2, 32)]
    assert shape_classes(model, 32, 3) == [ShapeClass(3, 1, 1), ShapeClass(3, 2, 32)]


def one_step(model, graphs: DecodeGraphs, cache: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step of one sequence over `context` positions: (compiled hidden states, eager ones)."""
    step = PagedStep([1], [context], [list(range(1, -(-context // 16) + 1))], 16)
    with torch.inference_mode():
        got, logits = graphs.run([57], step)
        want = model(torch.tensor([57]), Paged.from_arrays(step.arrays(), cache))
    # the main pass's library runs the output head too
    error = relative_error(logits, model.logits(got))
    assert error < (1e-5 if got.dtype == torch.float32 else 0.02), f"logits off by {error:.2e} (relative)"
    return got, want


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_a_compiled_pass_reads_the_models_weights_and_comes_from_the_cache_next_time(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model = load_model(MODEL, dtype=torch.float32)  # its own: a weight is changed below
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=512, kv_cache_bytes=32 << 20))
    engine.cache.tensor.normal_(generator=torch.Generator().manual_seed(0))  # contexts to attend over
    graphs = DecodeGraphs(model, engine.cache, max_batch=1, max_context=512, max_query_len=1, kind="compiled")
    for context in (40, 300):  # both context buckets, from one library
        got, want = one_step(model, graphs, engine.cache.tensor, context)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert graphs.num_graphs == 2 and graphs._aot.num_built == 1 and len(list(tmp_path.glob("*.pt2"))) == 1

    # the weights are the model's tensors, not copies: a change shows in the next step (packed again where the
    # kernels read them packed)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(2)
    assert pack_model_(model) > 0
    got, want = one_step(model, graphs, engine.cache.tensor, 40)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # an engine of other limits (cache size, context, sequences) serves its steps from the same library
    other = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=1024, kv_cache_bytes=16 << 20))
    other.cache.tensor.normal_(generator=torch.Generator().manual_seed(1))
    again = DecodeGraphs(model, other.cache, max_batch=4, max_context=1024, max_query_len=1, kind="compiled")
    got, want = one_step(model, again, other.cache.tensor, 700)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert again._aot.num_built == 0 and not again.failed


def test_an_unwritable_cache_directory_falls_back_to_one_of_the_process(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    assert writable_cache_dir() == tmp_path / "cache" and (tmp_path / "cache").is_dir()
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "a-file" / "cache"))  # cannot be created
    own = writable_cache_dir()
    assert own.is_dir() and own != tmp_path / "a-file" / "cache"
    assert f"cannot write compiled passes to {tmp_path / 'a-file' / 'cache'}" in caplog.text
    own.rmdir()


def test_only_bfloat16_weights_are_packed_and_only_on_a_cpu_with_amx():
    assert not packs_weights(torch.float32)
    assert packs_weights(torch.bfloat16) == torch.cpu._is_amx_tile_supported()


def test_libraries_holding_packed_weights_are_keyed_by_the_weights_values():
    """A library of packed weights is one model's: another's weights get their own (a library reading the weights
    in place is keyed by none)."""
    model = load_model(MODEL, dtype=torch.bfloat16)
    passes = [AOTPasses(FlatPass(model, 16), 1, 256, 256) for _ in range(2)]
    for p in passes:
        p.packs_weights = True  # whatever this CPU has
    digest = passes[0]._weights_digest()
    assert passes[1]._weights_digest() == digest
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1
    changed, reading = AOTPasses(FlatPass(model, 16), 1, 256, 256), AOTPasses(FlatPass(model, 16), 1, 256, 256)
    changed.packs_weights, reading.packs_weights = True, False
    assert changed._weights_digest() != digest
    assert reading._weights_digest() == ""


@pytest.mark.skipif(not packs_weights(torch.bfloat16), reason="packed weights need a CPU with AMX")
def test_a_bfloat16_pass_on_packed_weights_gives_the_eager_hidden_states(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model = load_model(MODEL, dtype=torch.bfloat16)
    engine = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=512, kv_cache_bytes=32 << 20))
    engine.cache.tensor.normal_(generator=torch.Generator().manual_seed(0))
    graphs = DecodeGraphs(model, engine.cache, max_batch=1, max_context=512, max_query_len=1, kind="compiled")
    got, want = one_step(model, graphs, engine.cache.tensor, 300)
    assert graphs._aot.packs_weights and graphs._aot.num_built == 1 and not graphs.failed
    error = relative_error(got, want)
    assert error < 0.02, f"relative error {error:.4f}"
