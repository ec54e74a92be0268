"""Tandem's DeepSeek-V3 against transformers' implementation, on small random checkpoints transformers wrote.

Covers MLA with and without the query bottleneck, group-limited routing, dense-then-MoE layer layouts, YaRN
(in both config.json forms), the dense and paged attention paths, incremental decoding, the engine's greedy
output with and without MTP speculation, FP8 checkpoints, selective expert loading and the errors a bad
checkpoint or request gets.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingError, SamplingParams
from tandem.model.attention_metadata import DenseCausal, Paged
from tandem.model.checkpoint import (SCALE_SUFFIX, SINGLE_FILE, Checkpoint, CheckpointError, is_fp8_linear,
                                     quantize_checkpoint_fp8, save_checkpoint)
from tandem.model.config import ConfigError
from tandem.model.deepseek_v3 import MLA, DeepseekV3ForCausalLM, MoE
from tandem.model.loading import load_experts, load_model
from tandem.model.presets import preset_config

# (q_lora_rank, n_group/topk_group, first_k_dense_replace, rope): every value of each appears at least twice
COMBOS = [
    dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=1, yarn=False, seed=1),
    dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=2, yarn=True, num_mtp_layers=2, seed=2),
    dict(q_lora_rank=None, n_group=2, topk_group=1, first_k_dense_replace=2, yarn=True, old_rope_config=True,
         rope_theta=5000.0, seed=3),
    dict(q_lora_rank=24, n_group=1, topk_group=1, first_k_dense_replace=2, yarn=False, old_rope_config=True,
         rope_theta=5000.0, seed=4),
    dict(q_lora_rank=None, n_group=4, topk_group=2, first_k_dense_replace=1, yarn=True, seed=5),
    dict(q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=1, yarn=True, old_rope_config=True,
         num_mtp_layers=2, seed=6),
    dict(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, yarn=False, seed=7),
    dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=2, yarn=True, seed=8),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: a second intra-op thread only adds synchronisation, and on a loaded machine
    spinning OpenMP threads slow the module down more than tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def combo_id(c: dict) -> str:
    rope = ("yarn" if c["yarn"] else "rope") + ("-old" if c.get("old_rope_config") else "")
    return f"q{c['q_lora_rank']}-g{c['n_group']}of{c['topk_group']}-dense{c['first_k_dense_replace']}-{rope}"


PROMPT_LENS = (5, 17, 33)
MAX_TOKENS = 20
BLOCK_SIZE = 4


def random_prompts(lengths, vocab_size: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to `rel` of the logits' scale (float32 paths agree to ~1e-6)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * scale, f"max |diff| {diff:.3g} > {rel} * logit scale {scale:.3g}"


def dense_logits(model: DeepseekV3ForCausalLM, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), DenseCausal.for_batch(1, len(ids))))


def kv_cache_for(model: DeepseekV3ForCausalLM, num_blocks: int) -> torch.Tensor:
    c = model.config
    return torch.zeros(c.num_kv_layers, num_blocks * BLOCK_SIZE, c.kv_cache_dim)


def scattered_block_tables(num_blocks_per_seq: list[int], num_blocks: int, seed: int) -> list[list[int]]:
    """Distinct blocks per sequence, in shuffled order (block 0 included), so no table is contiguous."""
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, start = [], 0
    for n in num_blocks_per_seq:
        tables.append(order[start:start + n])
        start += n
    return tables


def used_slots(tables: list[list[int]], lengths: list[int]) -> torch.Tensor:
    return torch.tensor([table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
                         for table, n in zip(tables, lengths) for pos in range(n)])


@dataclass
class Case:
    params: dict
    path: object
    hf: object  # transformers DeepseekV3ForCausalLM
    model: DeepseekV3ForCausalLM
    prompts: list[list[int]]
    _hf_greedy: list[list[int]] | None = None

    def hf_logits(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.hf(torch.tensor([ids])).logits[0].float()

    @property
    def hf_greedy(self) -> list[list[int]]:
        """transformers' greedy continuation of each prompt, one prompt at a time (no padding)."""
        if self._hf_greedy is None:
            out = []
            for prompt in self.prompts:
                ids = torch.tensor([prompt])
                with torch.no_grad():
                    generated = self.hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=MAX_TOKENS)[0, len(prompt):].tolist()
                assert len(generated) == MAX_TOKENS
                # the reference must be its own argmax chain, with no near-tie a rounding could flip
                logits = self.hf_logits(prompt + generated)[len(prompt) - 1:-1]
                assert logits.argmax(-1).tolist() == generated
                top2 = logits.topk(2, dim=-1).values
                assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "near-tie in the reference: pick another seed"
                out.append(generated)
            self._hf_greedy = out
        return self._hf_greedy


@pytest.fixture(scope="module", params=COMBOS, ids=combo_id)
def case(request, hf_checkpoint) -> Case:
    ckpt = hf_checkpoint(**request.param)
    model = load_model(ckpt.path)
    return Case(request.param, ckpt.path, ckpt.hf_model, model,
                random_prompts(PROMPT_LENS, model.config.vocab_size, request.param["seed"]))


# --- the model against transformers ------------------------------------------------------------------------

def test_config_read_from_transformers_checkpoint(case):
    c, p = case.model.config, case.params
    assert (c.q_lora_rank, c.n_group, c.topk_group, c.first_k_dense_replace) == \
        (p["q_lora_rank"], p["n_group"], p["topk_group"], p["first_k_dense_replace"])
    assert c.rope.rope_type == ("yarn" if p["yarn"] else "default")
    assert c.rope.rope_theta == p.get("rope_theta", 10000.0)
    assert c.num_nextn_predict_layers == len(case.model.mtp_layers) == p.get("num_mtp_layers", 1)
    assert c.eos_token_id == ()  # so that neither implementation stops before max_tokens


def test_dense_logits_match_transformers(case):
    for prompt in case.prompts:
        assert_logits_close(dense_logits(case.model, prompt), case.hf_logits(prompt))


def test_paged_batch_logits_match_transformers(case):
    """All three prompts in one engine-style prefill pass over a paged cache with scattered block tables (first
    chunks: each attends to itself over keys and values expanded from its latents)."""
    assert all(layer.self_attn._expanding_pays(n, n) for layer in case.model.main_layers for n in PROMPT_LENS)
    model, lengths = case.model, [len(p) for p in case.prompts]
    blocks = [math.ceil(n / BLOCK_SIZE) for n in lengths]
    num_blocks = sum(blocks) + 3  # a few blocks nobody owns
    tables = scattered_block_tables(blocks, num_blocks, seed=case.params["seed"])
    kv_cache = kv_cache_for(model, num_blocks)
    meta = Paged.build(query_lens=lengths, context_lens=lengths, block_tables=tables, block_size=BLOCK_SIZE,
                       kv_cache=kv_cache)
    with torch.inference_mode():
        logits = model.logits(model(torch.tensor([t for p in case.prompts for t in p]), meta))
    for prompt, rows in zip(case.prompts, logits.split(lengths)):
        assert_logits_close(rows, case.hf_logits(prompt))
    # each token's latent went to its own slot of each main layer, and nowhere else
    written = kv_cache.abs().sum(-1) != 0  # [layers, slots]
    expected = torch.zeros_like(written)
    expected[: model.config.num_hidden_layers, used_slots(tables, lengths)] = True
    assert torch.equal(written, expected)


def test_paged_prompts_of_one_length_match_transformers(case):
    """Whole prompts of one length in one pass: attention with the plain causal mask, no explicit one."""
    model, prompts = case.model, [p[:17] for p in case.prompts[1:]]
    blocks = [math.ceil(17 / BLOCK_SIZE)] * 2
    kv_cache = kv_cache_for(model, sum(blocks))
    meta = Paged.build(query_lens=[17, 17], context_lens=[17, 17], block_tables=scattered_block_tables(
        blocks, sum(blocks), seed=case.params["seed"]), block_size=BLOCK_SIZE, kv_cache=kv_cache)
    assert meta.query_index is None and meta.first_chunk_lens == [17, 17]
    with torch.inference_mode():
        logits = model.logits(model(torch.tensor(prompts[0] + prompts[1]), meta))
    for prompt, rows in zip(prompts, logits.split(17)):
        assert_logits_close(rows, case.hf_logits(prompt))


@pytest.mark.parametrize("preset", ["tiny", "moonlight"])
def test_prompt_chunks_expand_and_decode_steps_attend_over_the_latent(preset):
    """The bundled model's attention dims, and Moonlight's (DeepSeek-V3's, with 16 heads)."""
    with torch.device("meta"):
        mla = MLA(preset_config(preset, hidden_size=64), layer_idx=0)
    for context in (256, 4096):
        assert not any(mla._expanding_pays(query_len, context) for query_len in range(1, 5))  # decode, drafts
    assert all(mla._expanding_pays(n, n) for n in (16, 512, 2048))  # a whole prompt in one chunk
    assert mla._expanding_pays(2048, 4096)  # the second chunk of a long prompt


@pytest.mark.parametrize("form", ["expanded", "latent"])
def test_incremental_paged_decoding_matches_full_forward(case, form, monkeypatch):
    """Two sequences share each step: one fed a token at a time, the other in chunks of 3; attention over the
    cache in one form throughout (by its own rule a step this small attends over the latent)."""
    monkeypatch.setattr(MLA, "_expanding_pays", lambda self, query_len, context_len: form == "expanded")
    model = case.model
    seqs = random_prompts((23, 29), model.config.vocab_size, seed=100 + case.params["seed"])
    chunk = [1, 3]
    blocks = [math.ceil(len(s) / BLOCK_SIZE) for s in seqs]
    tables = scattered_block_tables(blocks, sum(blocks), seed=case.params["seed"])
    kv_cache = kv_cache_for(model, sum(blocks))
    fed = [0, 0]
    rows: list[list[torch.Tensor]] = [[], []]
    while any(f < len(s) for f, s in zip(fed, seqs)):
        active = [i for i in range(2) if fed[i] < len(seqs[i])]
        new = [min(chunk[i], len(seqs[i]) - fed[i]) for i in active]
        meta = Paged.build(query_lens=new, context_lens=[fed[i] + n for i, n in zip(active, new)],
                           block_tables=[tables[i] for i in active], block_size=BLOCK_SIZE, kv_cache=kv_cache)
        ids = torch.tensor([t for i, n in zip(active, new) for t in seqs[i][fed[i]:fed[i] + n]])
        with torch.inference_mode():
            logits = model.logits(model(ids, meta))
        for i, n, part in zip(active, new, logits.split(new)):
            rows[i].append(part)
            fed[i] += n
    for seq, parts in zip(seqs, rows):
        assert_logits_close(torch.cat(parts), dense_logits(model, seq))


@pytest.mark.parametrize("num_speculative_tokens", [0, 2])
def test_engine_greedy_tokens_match_transformers_generate(case, num_speculative_tokens):
    num_blocks = 64
    engine = Engine(case.model, EngineConfig(max_num_seqs=4, block_size=BLOCK_SIZE, num_kv_blocks=num_blocks,
                                             max_num_batched_tokens=16,  # the 33-token prompt prefills in chunks
                                             num_speculative_tokens=num_speculative_tokens,
                                             adaptive_speculation=False))
    completions = engine.generate(case.prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    assert [c.token_ids for c in completions] == case.hf_greedy
    assert [c.finish_reason for c in completions] == ["length"] * len(case.prompts)
    drafted = sum(c.spec.draft_tokens for c in completions)
    assert drafted > 0 if num_speculative_tokens else drafted == 0
    assert engine.num_free_blocks == num_blocks and not engine.has_unfinished


# --- FP8 ---------------------------------------------------------------------------------------------------

def copy_as(src, dst, dtype: torch.dtype) -> None:
    ckpt = Checkpoint(src)
    save_checkpoint(dst, ckpt.config, {name: ckpt.load(name, dtype=dtype) for name in ckpt.names()})


def fake_quantise(weight: torch.Tensor, block: int) -> torch.Tensor:
    """What block-wise e4m3 storage turns a 2-D weight into: each block scaled so its amax maps to 448, rounded
    by torch's own float8 cast, scaled back."""
    rows, cols = weight.shape
    out = torch.empty_like(weight)
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            w = weight[r:r + block, c:c + block]
            scale = w.abs().max() / 448.0
            out[r:r + block, c:c + block] = (w / scale).to(torch.float8_e4m3fn).float() * scale
    return out


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).pow(2).mean() / expected.pow(2).mean()).sqrt().item()


def test_fp8_checkpoint_matches_within_quantisation_error(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint(**COMBOS[1])  # q_lora and 2 MTP layers: every kind of FP8 linear
    copy_as(ckpt.path, tmp_path / "bf16", torch.bfloat16)
    quantize_checkpoint_fp8(tmp_path / "bf16", tmp_path / "fp8", block=(16, 16))

    bf16, fp8 = Checkpoint(tmp_path / "bf16"), Checkpoint(tmp_path / "fp8")
    assert fp8.config.weight_block_size == (16, 16)
    quantised = [n for n in bf16.names() if is_fp8_linear(n, bf16.tensor_shape(n))]
    for kind in (".experts.", ".shared_experts.", ".eh_proj.", ".q_a_proj.", ".kv_b_proj.", ".o_proj."):
        assert any(kind in n for n in quantised), kind
    for name in bf16.names():
        original = bf16.load(name)
        if name not in quantised:
            assert fp8.tensor_dtype(name) == torch.bfloat16 and torch.equal(fp8.load(name), original), name
            continue
        assert fp8.tensor_dtype(name) == torch.float8_e4m3fn, name
        rows, cols = original.shape  # e.g. q_a_proj [24, 32]: the row blocks end in a partial one
        assert fp8.tensor_shape(name + SCALE_SUFFIX) == (math.ceil(rows / 16), math.ceil(cols / 16)), name
        restored = fp8.load(name)
        assert not torch.equal(restored, original), f"{name} was not really quantised"
        assert torch.equal(restored, fake_quantise(original, 16)), name

    reference, from_bf16, from_fp8 = (load_model(p) for p in (ckpt.path, tmp_path / "bf16", tmp_path / "fp8"))
    bf16_params = dict(from_bf16.named_parameters())
    for name, param in from_fp8.named_parameters():
        expected = bf16_params[name].detach()
        if ".experts.bank." in name:
            expected = torch.stack([fake_quantise(w, 16) for w in expected])
        elif is_fp8_linear(name, tuple(param.shape)):
            expected = fake_quantise(expected, 16)
        assert torch.equal(param, expected), name

    ids = random_prompts([40], reference.config.vocab_size, seed=11)[0]
    ref = dense_logits(reference, ids)
    got_bf16, got_fp8 = dense_logits(from_bf16, ids), dense_logits(from_fp8, ids)
    # e4m3 rounds each weight by up to 1/16 (~1.7% rms here). This random model amplifies weight noise
    # strongly (a few tokens change experts), so bound the rms change and the argmax, not the largest entry.
    assert relative_rms(got_fp8, ref) <= 0.3
    assert (got_fp8.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.7
    assert relative_rms(got_fp8, ref) > 3 * relative_rms(got_bf16, ref)  # the quantisation did show

    def mtp_logits(model):  # the MTP modules' quantised weights load too
        with torch.inference_mode():
            meta = DenseCausal.for_batch(1, len(ids) - 1)
            prev = model.mtp_hidden_from_main(model(torch.tensor(ids[:-1]), meta))
            return model.mtp_logits(0, model.mtp_forward(0, torch.tensor(ids[1:]), prev, meta))
    assert relative_rms(mtp_logits(from_fp8), mtp_logits(reference)) <= 0.3


# --- selective loading -------------------------------------------------------------------------------------

def expert_sharded_copy(src, dst) -> dict[str, str]:
    """Copy a checkpoint so that routed experts live in shards of their own; returns the weight map."""
    ckpt = Checkpoint(src)
    names = sorted(ckpt.names(), key=lambda n: ".experts." in n)  # experts last
    tensors = {n: ckpt.load(n) for n in names}
    rest = sum(t.numel() * t.element_size() for n, t in tensors.items() if ".experts." not in n)
    save_checkpoint(dst, ckpt.config, tensors, max_shard_bytes=rest)
    return json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]


def test_attention_worker_loads_no_routed_expert(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint(**COMBOS[2])
    weight_map = expert_sharded_copy(ckpt.path, tmp_path)
    expert_shards = {shard for name, shard in weight_map.items() if ".experts." in name}
    assert expert_shards.isdisjoint(shard for name, shard in weight_map.items() if ".experts." not in name)
    full = load_model(tmp_path)
    for shard in expert_shards:  # an attention worker must not need them
        (tmp_path / shard).unlink()

    worker = load_model(tmp_path, load_routed_experts=False)
    c = worker.config
    banks = [layer.mlp.experts.bank for layer in worker.model.layers if isinstance(layer.mlp, MoE)]
    assert len(banks) == c.num_moe_layers + c.num_nextn_predict_layers
    for bank in banks:
        assert bank.num_slots == 0
        assert bank.gate_proj.shape == bank.up_proj.shape == (0, c.moe_intermediate_size, c.hidden_size)
        assert bank.down_proj.shape == (0, c.hidden_size, c.moe_intermediate_size)
    full_params = dict(full.named_parameters())
    for name, param in worker.named_parameters():
        if ".experts.bank." not in name:
            assert torch.equal(param, full_params[name]), name

    with pytest.raises(CheckpointError, match="cannot open shard"):
        load_model(tmp_path)


def test_load_experts_reads_only_the_asked_experts(hf_checkpoint, tmp_path):
    ckpt = hf_checkpoint(**COMBOS[2])
    weight_map = expert_sharded_copy(ckpt.path, tmp_path)
    layer, experts = 2, [1, 5]
    reader = Checkpoint(tmp_path)
    got = load_experts(reader, layer, experts)
    wanted = {f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" for e in experts
              for proj in ("gate_proj", "up_proj", "down_proj")}
    assert reader.shards_opened == {weight_map[name] for name in wanted}

    hf_experts = ckpt.hf_model.model.layers[layer].mlp.experts  # gate and up packed as [E, 2I, D]
    gate, up = hf_experts.gate_up_proj.detach()[experts].chunk(2, dim=1)
    assert torch.equal(got["gate_proj"], gate)
    assert torch.equal(got["up_proj"], up)
    assert torch.equal(got["down_proj"], hf_experts.down_proj.detach()[experts])


# --- bad checkpoints ---------------------------------------------------------------------------------------

def set_tensor(name: str, value: torch.Tensor | None):
    """Damage: store `value` as tensor `name` of model.safetensors (None: drop the tensor)."""
    def damage(path):
        tensors = load_file(path / SINGLE_FILE)
        tensors.pop(name)
        if value is not None:
            tensors[name] = value
        save_file(tensors, path / SINGLE_FILE, metadata={"format": "pt"})
    return damage


def set_model_type(model_type: str):
    def damage(path):
        raw = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(raw | {"model_type": model_type}))
    return damage


def remove_config(path) -> None:
    (path / "config.json").unlink()


KV_B = "model.layers.1.self_attn.kv_b_proj.weight"
EXPERT_UP = "model.layers.2.mlp.experts.3.up_proj.weight"
BAD_CHECKPOINTS = {  # damage, error type, what the message must name ({path}: the checkpoint directory)
    "unsupported model_type": (set_model_type("llama"), ConfigError, ["config.json", "model_type", "'llama'"]),
    "missing tensor": (set_tensor(KV_B, None), CheckpointError, [KV_B, "{path}"]),
    "wrong shape": (set_tensor(EXPERT_UP, torch.zeros(16, 31)), CheckpointError,
                    [EXPERT_UP, "(16, 31)", "(16, 32)", "{path}"]),
    "unsupported dtype": (set_tensor("model.norm.weight", torch.ones(32, dtype=torch.int32)), CheckpointError,
                          ["model.norm.weight", "I32", "{path}"]),
    "missing config.json": (remove_config, ConfigError, ["config.json", "{path}"]),
}


@pytest.mark.parametrize("damage", BAD_CHECKPOINTS)
def test_bad_checkpoint_gets_a_clear_error(hf_checkpoint, tmp_path, damage):
    corrupt, error_type, parts = BAD_CHECKPOINTS[damage]
    path = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoint(**COMBOS[0]).path, path)
    corrupt(path)
    with pytest.raises(error_type) as error:
        load_model(path)
    for part in parts:
        part = part.format(path=path)
        assert part in str(error.value), f"{part!r} not in {error.value!r}"


# --- bad requests ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model(hf_checkpoint) -> DeepseekV3ForCausalLM:
    return load_model(hf_checkpoint(**COMBOS[0]).path)


BAD_REQUESTS = {
    "token past the vocabulary": (dict(prompt_ids=[3, 96, 4]), ["prompt token id 96", "[0, 96)"]),
    "negative token": (dict(prompt_ids=[-1]), ["prompt token id -1"]),
    "empty prompt": (dict(prompt_ids=[]), ["prompt"]),
    "beyond the context": (dict(prompt_ids=[1] * 250, params=SamplingParams(max_tokens=10)),
                           ["max_tokens", "250", "256"]),
    "negative num_speculative_tokens": (dict(num_speculative_tokens=-1), ["num_speculative_tokens", "-1"]),
    "stop strings without a tokenizer": (dict(params=SamplingParams(stop=("\n",))), ["stop", "tokenizer"]),
}


@pytest.mark.parametrize("bad", BAD_REQUESTS)
def test_bad_request_raises_sampling_error_naming_the_field(small_model, bad):
    request, parts = BAD_REQUESTS[bad]
    engine = Engine(small_model, EngineConfig(max_num_seqs=2, block_size=BLOCK_SIZE, num_kv_blocks=128,
                                              num_speculative_tokens=1))
    free = engine.num_free_blocks
    kwargs = dict(prompt_ids=[1, 2, 3], params=SamplingParams(max_tokens=4)) | request
    with pytest.raises(SamplingError) as error:
        engine.add_request(kwargs.pop("prompt_ids"), kwargs.pop("params"), **kwargs)
    for part in parts:
        assert part in str(error.value), f"{part!r} not in {error.value!r}"
    assert not engine.has_unfinished and engine.num_free_blocks == free
    # the engine still serves a good request afterwards
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4))[0].token_ids) == 4
