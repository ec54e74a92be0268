"""`tandem` command line: init-model, generate (streaming and --json), stop strings, error messages."""

import json

import pytest
import torch

from tandem.cli import main


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["init-model", "--out", str(out), "--preset", "tiny"]) == 0
    return out


def run_json(capsys, *args) -> dict:
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_generate_json_has_tokens_text_and_spec(demo_model, capsys):
    result = run_json(capsys, "--model", str(demo_model), "--prompt", "def main():", "--max-tokens", "12",
                      "--ignore-eos", "--speculative-tokens", "2", "--no-adaptive-speculation")
    assert len(result["token_ids"]) == 12
    assert result["finish_reason"] == "length"
    assert isinstance(result["text"], str) and result["text"]
    spec = result["spec"]
    assert spec["draft_tokens"] > 0 and len(spec["acceptance_by_position"]) == 2
    assert set(spec) == {"steps", "draft_tokens", "accepted_tokens", "mean_accepted_length", "acceptance_by_position"}


def test_streamed_text_equals_json_text(demo_model, capsys):
    args = ["--model", str(demo_model), "--prompt", "import os", "--max-tokens", "10", "--ignore-eos"]
    assert main(["generate", *args]) == 0
    streamed = capsys.readouterr().out
    assert streamed == run_json(capsys, *args)["text"] + "\n"


def test_stop_string_cuts_text_and_finishes(demo_model, capsys):
    base = ["--model", str(demo_model), "--prompt", "class A:", "--max-tokens", "24", "--ignore-eos"]
    full = run_json(capsys, *base)["text"]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    cut = run_json(capsys, *base, "--stop", stop)
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


def test_compiled_decode_steps_generate_the_eager_tokens(demo_model, capsys):
    args = ["--model", str(demo_model), "--prompt-ids", "5,6,7", "--max-tokens", "6", "--ignore-eos",
            "--speculative-tokens", "0"]
    eager = run_json(capsys, *args)["token_ids"]
    assert main(["generate", *args, "--compile"]) == 0
    streamed = capsys.readouterr()
    assert "--compile: compiling the decode steps first" in streamed.err  # the wait is announced
    assert run_json(capsys, *args, "--compile")["token_ids"] == eager


def test_seeded_sampling_is_reproducible(demo_model, capsys):
    args = ["--model", str(demo_model), "--prompt-ids", "5,6,7", "--max-tokens", "8", "--temperature", "0.8",
            "--seed", "11", "--ignore-eos"]
    assert run_json(capsys, *args)["token_ids"] == run_json(capsys, *args)["token_ids"]


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "1.5"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--top-k", "-2"], "top_k"),
    (["--speculative-tokens", "-1"], "speculative-tokens"),
])
def test_bad_flags_get_one_line_errors(demo_model, capsys, flags, message):
    assert main(["generate", "--model", str(demo_model), "--prompt-ids", "1,2", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_prompt_ids_and_missing_model(tmp_path, demo_model, capsys):
    assert main(["generate", "--model", str(demo_model), "--prompt-ids", "1,x"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert main(["generate", "--model", str(demo_model), "--prompt-ids", "999999"]) == 2
    assert "999999" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_earliest_stop_string_wins():
    """Two stop strings arrive in one token: the text ends before the one that comes first."""
    from tokenizers import Tokenizer, models

    from tandem.engine.detokenizer import Detokenizer
    tok = Tokenizer(models.WordLevel({"a": 0, "xbyc": 1}, unk_token="a"))
    detok = Detokenizer(tok, stop=("b", "c"))
    assert detok.add(0) == ("", False) or detok.text == "a"
    piece, stopped = detok.add(1)
    assert stopped and detok.text.endswith("x") and "b" not in detok.text and "c" not in detok.text


def test_quantize_writes_an_fp8_checkpoint_that_generates_the_same_greedy_start(demo_model, tmp_path, capsys):
    from tandem.model.checkpoint import Checkpoint

    out = tmp_path / "fp8"
    assert main(["quantize", str(demo_model), "--out", str(out)]) == 0
    assert "MiB" in capsys.readouterr().out
    fp8 = Checkpoint(out)
    assert fp8.tensor_dtype("model.layers.1.mlp.experts.0.up_proj.weight") == torch.float8_e4m3fn
    args = ["--prompt-ids", "5,6,7,8", "--max-tokens", "3", "--ignore-eos", "--speculative-tokens", "0"]
    assert run_json(capsys, "--model", str(out), *args)["finish_reason"] == "length"
    assert main(["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_generate_gateway_flags_that_belong_to_the_workers_are_refused(capsys):
    assert main(["generate", "--gateway", "127.0.0.1:1", "--prompt", "x", "--dtype", "bfloat16"]) == 2
    assert "--dtype is a setting of the cluster's workers" in capsys.readouterr().err
    assert main(["generate", "--gateway", "127.0.0.1:1", "--prompt", "x", "--no-cuda-graphs"]) == 2
    assert "--no-cuda-graphs is a setting of the cluster's workers" in capsys.readouterr().err
    assert main(["generate", "--gateway", "127.0.0.1:1", "--prompt", "x", "--compile"]) == 2
    assert "--compile is a setting of the cluster's workers" in capsys.readouterr().err
    assert main(["generate", "--gateway", "127.0.0.1:1", "--prompt-ids", "1", "--ignore-eos"]) == 2
    assert "--ignore-eos" in capsys.readouterr().err
