"""Decode steps and MTP passes padded to graph buckets (`tandem.engine.decode_graphs`), run eagerly on the CPU:
the padding must not change a token. tests/devices captures and replays the same steps as CUDA graphs."""

from pathlib import Path

import pytest
import torch

from tandem.engine.decode_graphs import CONTEXT_STEP, DecodeGraphs, batch_buckets
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.attention_metadata import Paged, PagedStep
from tandem.model.loading import load_model

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"
# three lengths, so the batch shrinks from 3 (bucket 4) to 2 and 1 as requests finish
PROMPTS = [[0, 57, 1203, 88, 412, 9, 3071, 15] * 3, [0, 2048, 17, 17, 301], [0] + list(range(100, 140))]
MAX_TOKENS = [12, 20, 28]


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL, dtype=torch.float32)


def generate(model, k: int, graphs: bool) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, EngineConfig(max_num_seqs=8, num_speculative_tokens=k, adaptive_speculation=False,
                                        max_model_len=512, kv_cache_bytes=32 << 20))
    if graphs:
        engine.use_decode_graphs("eager")
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return [c.token_ids for c in engine.generate(PROMPTS, params)], engine


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


@pytest.mark.parametrize("k", [0, 2])
def test_padded_decode_steps_give_the_tokens_of_eager_steps(model, k):
    want, _ = generate(model, k, graphs=False)
    got, engine = generate(model, k, graphs=True)
    assert got == want
    graphs = engine.graphs
    assert graphs.num_replays > 0
    assert graphs.num_graphs >= 3  # batch buckets 4, 2 and 1 at least
    # the MTP modules' passes (catch-up on 1-3 verified tokens, and module 1's draft position) ran from graphs
    assert [g.num_replays > 0 for g in engine.drafter.graphs] == [True] * k
    # the scratch block, shared by every graph, stays reserved; every other block came back
    assert engine.cache.allocator.num_free == engine.cache.allocator.num_blocks - 1
    assert graphs.scratch_slot // engine.cache.block_size not in engine.cache.allocator._free
    assert all(g.scratch_slot == graphs.scratch_slot for g in engine.drafter.graphs)


def test_steps_without_a_graph_shape_run_eagerly(model):
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=512, kv_cache_bytes=32 << 20))
    graphs = DecodeGraphs(model, engine.cache, max_batch=2, max_context=CONTEXT_STEP, max_query_len=1, kind="eager")
    tables = [[1, 2, 3]] * 3
    # a prompt chunk, even one every sequence of the step brings alike
    assert graphs.run([5, 6, 7, 8], PagedStep([2, 2], [10, 4], tables[:2], 16)) is None
    # more sequences than the largest bucket
    assert graphs.run([5, 6, 7], PagedStep([1, 1, 1], [4, 4, 4], tables, 16)) is None
    # a context past the largest captured one
    assert graphs.run([5], PagedStep([1], [CONTEXT_STEP + 1], [list(range(20))], 16)) is None
    assert graphs.num_graphs == 0


def test_steps_that_capture_a_graph_are_not_timed_for_the_speculation_policy(model):
    engine = Engine(model, EngineConfig(max_num_seqs=8, num_speculative_tokens=2, max_model_len=512,
                                        kv_cache_bytes=32 << 20))
    engine.use_decode_graphs("eager")
    recorded = []
    record_verify = engine.policy.record_verify
    # every step reports to the policy; one that tells it nothing reports no draft count (None)
    engine.policy.record_verify = lambda *args: (args[0] is not None and recorded.append(args), record_verify(*args))
    drafted = []  # the same for the MTP work after a step
    record_draft = engine.policy.record_draft
    engine.policy.record_draft = lambda *args: (args[0] is not None and drafted.append(args), record_draft(*args))
    for prompt, n in zip(PROMPTS, MAX_TOKENS):
        engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
    capturing_steps = timed_steps = capturing_drafts = timed_drafts = 0
    while engine.has_unfinished:
        graphs, records = engine.graphs.num_graphs, len(recorded)
        mtp_graphs, draft_records = sum(g.num_graphs for g in engine.drafter.graphs), len(drafted)
        engine.step()
        if engine.graphs.num_graphs > graphs:
            capturing_steps += 1
            assert len(recorded) == records, "a step that captured a graph was timed"
        if sum(g.num_graphs for g in engine.drafter.graphs) > mtp_graphs:
            capturing_drafts += 1
            assert len(drafted) == draft_records, "MTP work that captured a graph was timed"
        timed_steps += len(recorded) > records
        timed_drafts += len(drafted) > draft_records
    assert capturing_steps >= 3 and timed_steps > 0
    assert capturing_drafts >= 3 and timed_drafts > 0


# compiled, an MTP pass takes the previous hidden states as one more input (the engine does not compile MTP
# passes on the CPU, see Engine.use_decode_graphs, but a graph of one must still be right)
@pytest.mark.parametrize(("mtp_module", "kind"), [(None, "eager"), (0, "eager"), (0, "compiled")])
def test_uneven_steps_are_padded_into_a_graph(model, mtp_module, kind):
    """Sequences bringing different numbers of tokens (a verification of two drafts beside a decode token, as an
    MTP module's catch-up after different acceptances) run from one graph of the step's most tokens, padded."""
    engine = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=512, kv_cache_bytes=32 << 20))
    engine.cache.tensor.normal_(generator=torch.Generator().manual_seed(0))  # contexts to attend over
    graphs = DecodeGraphs(model, engine.cache, max_batch=4, max_context=512, max_query_len=3, kind=kind,
                          mtp_module=mtp_module)
    step = PagedStep([3, 1, 2], [40, 21, 300], [[1, 2, 3], [4, 5], list(range(6, 25))], 16)
    ids = [5, 6, 7, 8, 9, 10]
    hidden = torch.randn(len(ids), model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, logits = graphs.run(ids, step, hidden if mtp_module is not None else None)
        meta = Paged.from_arrays(step.arrays(), engine.cache.tensor)
        ids_t = torch.tensor(ids)
        want = model(ids_t, meta) if mtp_module is None else model.mtp_forward(0, ids_t, hidden, meta)
    assert graphs.num_graphs == 1 and graphs.num_replays == 1  # batch bucket 4, 3 tokens, 512 positions
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if mtp_module is None:  # the main pass runs the output head in the graph, on the same padded rows
        torch.testing.assert_close(logits, model.logits(want), rtol=1e-4, atol=1e-4)
    else:
        assert logits is None


def two_sequence_engine(model, **config) -> Engine:
    return Engine(model, EngineConfig(max_num_seqs=2, max_model_len=256, kv_cache_bytes=32 << 20, **config))


def generate_two(engine: Engine) -> list[list[int]]:
    """Greedy tokens of two prompts of 20 and 12 tokens: 11 decode steps of two sequences, then 8 of one."""
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (20, 12)]
    return [c.token_ids for c in engine.generate(PROMPTS[:2], params)]


def test_compiled_decode_steps_give_the_tokens_of_eager_steps(model):
    """`compile_decode`: uniform decode steps run from passes compiled ahead of time (batch buckets 2 and 1 here), built
    when the engine starts, and write their latents into the engine's cache in place: a lost write would change
    every later token."""
    want = generate_two(two_sequence_engine(model))
    engine = two_sequence_engine(model, compile_decode=True)
    assert engine.graphs.kind == "compiled" and engine.graphs.num_graphs == 2  # both buckets, before any step
    assert generate_two(engine) == want
    assert not engine.graphs.failed
    assert engine.graphs.num_graphs == 2  # no step had to build one
    assert engine.graphs.num_replays == 11 + 8  # every decode step


def test_compiled_verification_steps_keep_greedy_tokens(model):
    """Two drafts every step: the compiled graphs of 2 and 3 tokens per sequence verify them, and greedy
    speculative decoding must emit the tokens of plain greedy decoding."""
    want = generate_two(two_sequence_engine(model))
    engine = two_sequence_engine(model, num_speculative_tokens=2, adaptive_speculation=False, compile_decode=True)
    assert generate_two(engine) == want
    assert engine.spec_totals.draft_tokens > 0 and not engine.graphs.failed
    assert engine.graphs.num_replays > 0  # verification steps of 3 tokens each ran from compiled graphs
    assert engine.graphs.num_graphs == 6  # batch buckets 1 and 2 x 1, 2 or 3 tokens, all built at start
    assert engine.drafter.graphs == []  # compiled MTP passes do not pay on the CPU (Engine.use_decode_graphs)
