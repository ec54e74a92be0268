"""Training: tokenizer, data split, objectives, load balancing, checkpoints, resume, MTP-D and looped extension.

Everything runs a tiny model (hidden 32, 2 layers, 8 experts, vocabulary 300) on a few stdlib files.
"""

import json

import pytest
import torch

from tandem.cli import _build_parser
from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.model.loading import load_model
from tandem.model.tokenizer import load_tokenizer
from tandem.train.balancing import update_correction_bias_
from tandem.train.cli import config_from_args
from tandem.train.data import HELD_OUT, read_source, split_corpus, training_batch
from tandem.train.objectives import compute_terms, topn_kl
from tandem.train.tokenizer import SPECIAL_TOKENS, train_tokenizer
from tandem.train.config import TrainConfig
from tandem.train.trainer import STATE_FILE, Trainer, extend_mtp_modules, train

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, moe_intermediate_size=16,
            num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=128)


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), model_overrides=TINY, vocab_size=300, max_files=4, seq_len=32, batch_size=4,
                steps=4, warmup_steps=1, lr=1e-2, checkpoint_every=2, eval_every=100, eval_batches=1,
                show_progress=False)
    return TrainConfig(**(base | kw))


def main_params(model) -> dict[str, torch.Tensor]:
    """Everything outside the MTP layers, correction biases included."""
    prefixes = tuple(f"model.layers.{model.config.num_hidden_layers + k}." for k in range(len(model.mtp_layers)))
    return {n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith(prefixes)}


def mtp_params(model, k: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{model.config.num_hidden_layers + k}."
    return {n[len(prefix):]: t.detach().clone() for n, t in model.state_dict().items() if n.startswith(prefix)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """A 4-step main-stage run with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("main_run")
    return out, train(tiny_config(out))


# --- tokenizer and data -------------------------------------------------------------------------------------

def test_tokenizer_round_trips_stdlib_files_byte_exactly():
    split = split_corpus()
    tokenizer = train_tokenizer(split.train[:4], vocab_size=300)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    files = list(split.train[:2]) + list(split.heldout[:1])
    files += [f for f in split.train + split.heldout if not f.read_bytes().isascii()][:3]
    assert len(files) == 6
    for f in files:
        text = read_source(f)
        assert tokenizer.decode(tokenizer.encode(text).ids).encode("utf-8") == f.read_bytes(), f


def test_split_by_file_is_disjoint_and_deterministic():
    a, b = split_corpus(), split_corpus()
    assert a == b
    assert not set(a.train) & set(a.heldout)
    rel = lambda p: p.relative_to(a.root)  # noqa: E731
    held_names = {rel(p).parts[0].removesuffix(".py") for p in a.heldout}
    assert held_names == set(HELD_OUT)
    assert all(rel(p).parts[0].removesuffix(".py") not in HELD_OUT for p in a.train)
    assert not any({"test", "site-packages", "idlelib"} & set(rel(p).parts) for p in a.train + a.heldout)


def test_training_batches_depend_only_on_seed_and_step():
    stream = torch.arange(1000)
    assert torch.equal(training_batch(stream, 33, 4, seed=1, step=5), training_batch(stream, 33, 4, seed=1, step=5))
    assert not torch.equal(training_batch(stream, 33, 4, seed=1, step=5), training_batch(stream, 33, 4, seed=1, step=6))
    rows = training_batch(stream, 33, 4, seed=1, step=5)
    assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(4, 32, dtype=torch.int64))  # contiguous windows


# --- objectives and balancing -------------------------------------------------------------------------------

def test_each_loss_term_decreases(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, steps=12, warmup_steps=2))
    batch = training_batch(trainer.train_stream, 33, 4, seed=0, step=0)
    with torch.no_grad():
        before = compute_terms(trainer.model, batch)
        for _ in range(12):
            with torch.enable_grad():
                trainer.train_step()
        after = compute_terms(trainer.model, batch)
    assert set(before) == {"main", "mtp1", "mtp2"}
    for name in before:
        assert after[name] < before[name] - 0.5, (name, float(before[name]), float(after[name]))


def test_topn_kl_is_zero_for_matching_distributions_and_positive_otherwise():
    teacher = torch.randn(5, 50)
    assert topn_kl(teacher, teacher, top_n=50).abs() < 1e-5
    assert topn_kl(teacher, teacher, top_n=10) > 0  # the student's mass outside the top 10 counts against it
    assert topn_kl(teacher, torch.randn(5, 50), top_n=10) > topn_kl(teacher, teacher, top_n=10)


def test_bias_update_moves_against_the_load_error():
    bias = torch.zeros(4)
    update_correction_bias_(bias, torch.tensor([5, 1, 3, 3]), speed=0.01)
    assert torch.equal(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_training_step_updates_correction_biases(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, bias_update_speed=0.01))
    gates = [m.gate for m in trainer.load.layers]
    assert len(gates) == 3  # one main MoE layer, two MTP layers
    trainer.train_step()
    for gate in gates:
        moved = gate.e_score_correction_bias
        assert not moved.requires_grad
        assert set((moved / 0.01).round().tolist()) <= {-1.0, 0.0, 1.0} and moved.abs().sum() > 0


# --- checkpoints and resume ---------------------------------------------------------------------------------

def test_checkpoint_loads_and_generates(main_run):
    out, final = main_run
    assert final == out / "step-000004" and (out / "latest").read_text().strip() == "step-000004"
    assert (out / "step-000002" / STATE_FILE).exists()
    model = load_model(final)
    assert len(model.mtp_layers) == 2
    tokenizer = load_tokenizer(final)
    prompt = tokenizer.encode("def main():\n    ").ids
    [completion] = Engine(model, EngineConfig(num_speculative_tokens=2), tokenizer).generate(
        [prompt], SamplingParams(max_tokens=16, ignore_eos=True))
    assert len(completion.token_ids) == 16
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "heldout"} == {r["split"] for r in records}


def test_resume_matches_an_uninterrupted_run(main_run, tmp_path):
    out, final = main_run
    interrupted = Trainer(tiny_config(tmp_path))
    for _ in range(2):
        interrupted.train_step()
    interrupted.save()
    resumed = Trainer(tiny_config(tmp_path, resume=True))
    assert resumed.step == 2
    assert resumed.run() == tmp_path / "step-000004"
    assert same(load_model(final).state_dict(), resumed.model.state_dict())


# --- MTP-D, looped extension, Meta-style heads ---------------------------------------------------------------

def test_mtpd_trains_mtp_modules_only_and_teacher_gets_no_gradient(main_run, tmp_path):
    _, final = main_run
    trainer = Trainer(tiny_config(tmp_path, stage="mtpd", init_from=str(final), steps=8, kl_top_n=8))
    frozen, heads = main_params(trainer.model), [mtp_params(trainer.model, k) for k in range(2)]
    batch = training_batch(trainer.train_stream, 33, 4, seed=0, step=0)
    with torch.no_grad():
        before = compute_terms(trainer.model, batch, train_main=False, kl_top_n=8)
    record = trainer.train_step()
    assert {"kl1", "kl2", "mtp1", "mtp2"} <= set(record)
    assert all(p.grad is None for n, p in trainer.model.named_parameters() if n in frozen)
    assert all(p.grad is not None for p in trainer.model.mtp_layers[0].eh_proj.parameters())
    trainer.run()
    assert same(frozen, main_params(trainer.model))  # bit for bit
    assert all(not same(heads[k], mtp_params(trainer.model, k)) for k in range(2))
    with torch.no_grad():
        after = compute_terms(trainer.model, batch, train_main=False, kl_top_n=8)
    for name in ("mtp1", "mtp2", "kl1", "kl2"):
        assert after[name] < before[name], (name, float(before[name]), float(after[name]))
    assert torch.equal(after["main"], before["main"])


def test_looped_extension_copies_modules_and_trains_only_the_new_ones(main_run, tmp_path):
    _, final = main_run
    grown = extend_mtp_modules(load_model(final))
    assert grown.config.num_nextn_predict_layers == 4
    assert same(mtp_params(grown, 2), mtp_params(grown, 0)) and same(mtp_params(grown, 3), mtp_params(grown, 1))

    trainer = Trainer(tiny_config(tmp_path, stage="extend", init_from=str(final), steps=3))
    before = main_params(trainer.model), [mtp_params(trainer.model, k) for k in range(4)]
    last = trainer.run()
    assert same(before[0], main_params(trainer.model))
    assert same(before[1][0], mtp_params(trainer.model, 0)) and same(before[1][1], mtp_params(trainer.model, 1))
    assert not same(before[1][2], mtp_params(trainer.model, 2)) and not same(before[1][3], mtp_params(trainer.model, 3))
    assert len(load_model(last).mtp_layers) == 4


def test_meta_heads_keep_the_token_input_at_zero(tmp_path):
    last = train(tiny_config(tmp_path, head_type="meta", steps=2))
    assert json.loads((last / "config.json").read_text())["mtp_head_type"] == "meta"
    model = load_model(last)
    for layer in model.mtp_layers:
        assert layer.eh_proj.weight[:, :32].abs().max() == 0 and layer.eh_proj.weight[:, 32:].abs().max() > 0


# --- command line -------------------------------------------------------------------------------------------

def test_cli_flags_map_to_train_config(tmp_path):
    args = _build_parser().parse_args(["train", "--out", str(tmp_path), "--stage", "mtpd", "--init-from", "x",
                                       "--model-override", "hidden_size=64", "--kl-beta", "0.5", "--resume"])
    cfg = config_from_args(args)
    assert (cfg.stage, cfg.init_from, cfg.model_overrides, cfg.kl_beta, cfg.resume) == \
        ("mtpd", "x", {"hidden_size": 64}, 0.5, True)
    with pytest.raises(ValueError, match="init_from"):
        config_from_args(_build_parser().parse_args(["train", "--out", str(tmp_path), "--stage", "extend"]))
