"""Token healing with the bundled model's real tokenizer: which prompts are backed up, the first-token
constraint in the engine, the text the prompt already shows left out, and `tandem generate --prompt "def "`
writing a plausible function definition."""

from __future__ import annotations

import codeop
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingError, SamplingParams
from tandem.engine.token_healing import TokenHealer
from tandem.model.attention_metadata import DenseCausal
from tandem.model.loading import load_model
from tandem.model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-code"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def healer(tokenizer):
    return TokenHealer(tokenizer)


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL).eval()


def test_a_trailing_space_is_backed_up_and_constrains_the_first_token(tokenizer, healer):
    ids = tokenizer.encode("def ").ids
    healed = healer.heal(ids)
    assert healed.prompt_ids == ids[:-1] and healed.prefix == tokenizer.decode(ids[-1:]) == " "
    texts = {t: tokenizer.decode([t]) for t in range(tokenizer.get_vocab_size())}
    assert set(healed.allowed_first_tokens) == {t for t, text in texts.items() if text.startswith(" ")}
    assert len(healed.allowed_first_tokens) > 100  # " name", " =", ... not only the lone space


def test_prompts_that_end_on_a_whole_token_or_are_one_token_stay_as_they_are(tokenizer, healer):
    texts = [tokenizer.decode([t]) for t in range(tokenizer.get_vocab_size())]
    ends_words = [t for t in tokenizer.encode("import os\nprint(os.getcwd())\n").ids
                  if sum(text.startswith(texts[t]) for text in texts) == 1]  # no longer token starts with it
    assert ends_words
    for t in ends_words:
        ids = [5, t]
        assert healer.heal(ids).prompt_ids == ids and not healer.heal(ids).allowed_first_tokens
    single = tokenizer.encode(" ").ids
    assert len(single) == 1 and healer.heal(single).prompt_ids == single  # nothing would be left
    eos = tokenizer.token_to_id("<|eos|>")
    assert not healer.heal([5, eos]).allowed_first_tokens  # special tokens are never healed


def test_the_engine_samples_the_first_token_from_the_allowed_set_only(model, tokenizer, healer):
    healed = healer.heal(tokenizer.encode("import os\nfor name in os.listdir(path):\n    if ").ids)
    params = healed.apply(SamplingParams(max_tokens=8))
    engine = Engine(model, EngineConfig(num_speculative_tokens=2), tokenizer)
    [out] = engine.generate([healed.prompt_ids], params)
    with torch.inference_mode():
        prompt = torch.tensor(healed.prompt_ids)
        logits = model.logits(model(prompt, DenseCausal.for_batch(1, len(prompt))))[-1]
    allowed = torch.tensor(healed.allowed_first_tokens)
    assert out.token_ids[0] == int(allowed[logits[allowed].argmax()])  # greedy within the set
    assert out.text == tokenizer.decode(out.token_ids)[len(healed.prefix):]
    sampled = engine.generate([healed.prompt_ids] * 4, [healed.apply(SamplingParams(max_tokens=2, temperature=1.5,
                                                                                     seed=s)) for s in range(4)])
    assert all(c.token_ids[0] in healed.allowed_first_tokens for c in sampled)


def test_bad_allowed_first_tokens_are_refused(model):
    engine = Engine(model, EngineConfig())
    with pytest.raises(SamplingError, match="allowed_first_tokens holds 99999, outside the vocabulary"):
        engine.add_request([5, 6], SamplingParams(allowed_first_tokens=(3, 99999)))
    with pytest.raises(SamplingError, match="allowed_first_tokens must be >= 0"):
        SamplingParams(allowed_first_tokens=(-1,))


def test_generate_def_writes_a_plausible_function_definition():
    """The issue's check: `tandem generate --model models/tiny-code --prompt "def "` gives Python."""
    out = subprocess.run([sys.executable, "-m", "tandem.cli", "generate", "--model", str(MODEL), "--prompt", "def ",
                          "--max-tokens", "48", "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    text = json.loads(out.stdout)["text"]
    source = "def " + text[: text.rfind("\n") + 1]
    assert re.match(r"def [A-Za-z_]\w*\(", source), source
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        codeop.compile_command(source, symbol="exec")  # raises SyntaxError on invalid code
