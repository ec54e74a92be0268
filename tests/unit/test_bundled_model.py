"""The bundled model (models/tiny-code) is trained: it loads from its FP8 checkpoint, predicts held-out code far
better than chance with every head, its MTP drafts are accepted, and speculation leaves greedy text unchanged.
(MODEL_CARD.md has the full figures; these bounds fail for an untrained or broken model.)"""

from __future__ import annotations

import codeop
import math
import warnings
from pathlib import Path

import pytest
import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.checkpoint import Checkpoint
from tandem.model.loading import load_model
from tandem.model.tokenizer import load_tokenizer
from tandem.train.data import encode_files, eval_windows, split_corpus
from tandem.train.objectives import compute_terms

MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-code"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL).eval()


@pytest.fixture(scope="module")
def heldout():
    files = [f for f in split_corpus().heldout if f.parent.name == "json"]  # a small held-out package
    return encode_files(load_tokenizer(MODEL), files)


def test_it_is_the_documented_fp8_deepseek_v3_with_two_mtp_modules(model):
    ckpt = Checkpoint(MODEL)
    assert ckpt.tensor_dtype("model.layers.1.mlp.experts.0.gate_proj.weight") == torch.float8_e4m3fn
    assert ckpt.has("model.layers.4.eh_proj.weight") and ckpt.has("model.layers.5.shared_head.head.weight")
    c = model.config
    assert (c.num_nextn_predict_layers, c.n_routed_experts, c.n_group) == (2, 16, 4)
    assert sum(f.stat().st_size for f in MODEL.iterdir()) < 25 * 2**20


def test_every_head_predicts_held_out_code_far_better_than_chance(model, heldout):
    windows = eval_windows(heldout, 129, 16)
    with torch.no_grad():
        terms = compute_terms(model, windows, train_main=False, with_metrics=True)
    chance = math.log(model.config.vocab_size)  # 8.3 nats
    for name in ("main", "mtp1", "mtp2"):
        assert terms[name] < 4.0 < chance, (name, float(terms[name]))
    assert terms["agree_mtp1"] > 0.5, float(terms["agree_mtp1"])


def test_mtp_drafts_are_accepted_and_greedy_text_does_not_change(model, heldout):
    prompts = [heldout[start:start + 64].tolist() for start in range(0, 4 * 500, 500)]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = Engine(model, EngineConfig(num_speculative_tokens=0)).generate(prompts, params)
    engine = Engine(model, EngineConfig(num_speculative_tokens=2, adaptive_speculation=False))
    spec = engine.generate(prompts, params)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    totals = engine.spec_totals.to_dict()
    assert totals["acceptance_by_position"][0] > 0.6, totals


def test_it_writes_syntactically_plausible_python(model):
    """Prompt plus greedy continuation (whole lines) is valid Python so far: complete, or an unfinished
    statement (codeop answers None), never a syntax error."""
    tokenizer = load_tokenizer(MODEL)
    for prompt in ("class Stack:\n    def __init__(self):\n", "import os\nimport sys\n\n\ndef main(argv):\n"):
        engine = Engine(model, EngineConfig(num_speculative_tokens=2), tokenizer)
        text = engine.generate([tokenizer.encode(prompt).ids], SamplingParams(max_tokens=48))[0].text
        source = prompt + text[: text.rfind("\n") + 1]
        assert source.count("\n") > prompt.count("\n"), text
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            codeop.compile_command(source, symbol="exec")  # raises SyntaxError on invalid code
