"""Decode throughput of Tandem's colocated engine against transformers' `generate`, same machine, same weights.

    python bench/engine.py --random-preset tiny --batch-sizes 1,8 --new-tokens 32 --prompt-len 64 --spec-tokens 0,2
    python bench/engine.py --random-preset moonlight --device cuda        # Moonlight-16B-A3B's shape, random bf16

Every run is greedy with EOS ignored, so each request generates exactly --new-tokens tokens. Tandem runs once per
batch size and speculation setting (MTP drafts per step, adaptive), each on one engine that a full-length warm-up run
has calibrated (as a server's engine is after its first requests), transformers once per batch size. With
--repeats N each batch size's configurations run in turn, N rounds, and each keeps its median run: a slow spell of
a shared machine then slows them alike (Moonlight's transformers runs come last: it takes over the weights). Writes
results.json and throughput.png into --out. A trained checkpoint (the default, models/tiny-code) gets prompts cut
from the held-out stdlib code, so its speculative rows show what MTP gains on the code it serves. Random weights
get random prompts and make MTP acceptance meaningless (drafts are rarely accepted); with them the speculative rows
measure what speculation costs, not what it gains.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.engine.engine import Engine, EngineConfig
from tandem.engine.sampling import SamplingParams
from tandem.engine.sequence import SpecStats
from tandem.model.checkpoint import save_checkpoint
from tandem.model.config import ModelConfig
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM, Gate, MoE
from tandem.model.loading import export_state_dict, load_model
from tandem.model.tokenizer import load_tokenizer
from tandem.train.data import encode_files, eval_windows, split_corpus

DEFAULT_MODEL = Path("models/tiny-code")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

PRESETS = {
    # a few million parameters; two MTP modules so that drafts 1 and 2 come from different modules
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 max_position_embeddings=1024, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, moe_intermediate_size=128,
                 num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, num_nextn_predict_layers=2,
                 bos_token_id=0, eos_token_id=(1,)),
    # Moonlight-16B-A3B's shape (about 16B parameters, 3B active); GPU only
    "moonlight": dict(vocab_size=163840, hidden_size=2048, intermediate_size=11264, num_hidden_layers=27,
                      num_attention_heads=16, max_position_embeddings=8192, rms_norm_eps=1e-5, q_lora_rank=None,
                      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      n_routed_experts=64, n_shared_experts=2, moe_intermediate_size=1408, num_experts_per_tok=6,
                      n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.446,
                      num_nextn_predict_layers=1, bos_token_id=163584, eos_token_id=(163585,)),
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- models --------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_random_(model: DeepseekV3ForCausalLM, seed: int) -> None:
    """Weights normal(0, 0.02), norms 1, routing correction biases 0."""
    generators: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("e_score_correction_bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            g = generators.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            p.normal_(0.0, 0.02, generator=g)


def random_checkpoint(config: ModelConfig, path: Path, dtype: torch.dtype, seed: int) -> None:
    """Write a random-weight checkpoint, stored in the dtype both engines will run in, so both read equal weights."""
    model = DeepseekV3ForCausalLM(config)
    init_random_(model, seed)
    save_checkpoint(path, config, {k: v.to(dtype) for k, v in export_state_dict(model).items()})


def random_model_on_device(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                           seed: int) -> DeepseekV3ForCausalLM:
    """Build a random model straight on the device (too large to write and read back quickly); as `load_model`
    does, router weights and correction biases stay float32."""
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).to(dtype)
        for module in model.modules():
            if isinstance(module, Gate):
                module.float()
    model.to_empty(device=device)
    model.init_buffers()
    init_random_(model, seed)
    return model.eval()


@torch.no_grad()
def transformers_from_tandem(model: DeepseekV3ForCausalLM):
    """A transformers model holding the Tandem model's weights. Moves them rather than copying (a second copy of a
    16B model does not fit next to the first), so `model` is left empty; the MTP layers are dropped."""
    import transformers

    device = model.lm_head.weight.device
    hf_config = transformers.DeepseekV3Config.from_dict(model.config.to_dict())
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(hf_config)
    source = dict(model.named_parameters())
    targets = [n for n, _ in hf.named_parameters()] + [n for n, _ in hf.named_buffers() if "rotary_emb" not in n]
    for name in targets:
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stacked as our expert banks stack them
            owner, _, proj = name.rpartition(".")
            value = source[f"{owner}.bank.{proj}"].data
        else:
            value = source[name].data
        owner_name, _, attr = name.rpartition(".")
        owner = hf.get_submodule(owner_name)
        if attr in owner._buffers:
            owner._buffers[attr] = value
        else:
            setattr(owner, attr, torch.nn.Parameter(value, requires_grad=False))
    # the rotary tables are not weights: rebuild them off the meta device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(device)
    for p in source.values():
        p.data = torch.empty(0, device=device)
    return hf.eval()


# --- bytes a decode step must read ---------------------------------------------------------------------------

def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@dataclass(slots=True)
class StepBytes:
    """Parameter and KV-cache bytes one forward pass reads, as a function of its token count."""

    main_fixed: int  # per main pass: attention, norms, dense MLPs, routers and shared experts of every main layer
    mtp_fixed: int  # per MTP pass, the same for one MTP layer (eh_proj included)
    expert: int  # one routed expert of one layer
    num_experts: int
    top_k: int
    num_main_moe_layers: int
    lm_head: int
    embedding_row: int
    kv_per_token_layer: int
    num_main_layers: int

    @classmethod
    def of(cls, model: DeepseekV3ForCausalLM) -> "StepBytes":
        c = model.config

        def fixed(layer) -> int:
            experts = layer.mlp.experts.bank.parameters() if isinstance(layer.mlp, MoE) else []
            return _nbytes(layer.parameters()) - _nbytes(experts)

        moe = [layer.mlp for layer in model.main_layers if isinstance(layer.mlp, MoE)]
        weight = model.lm_head.weight
        return cls(main_fixed=sum(fixed(layer) for layer in model.main_layers) + _nbytes(model.model.norm.parameters()),
                   mtp_fixed=fixed(model.mtp_layers[0]) if model.mtp_layers else 0,
                   expert=_nbytes(moe[0].experts.bank.parameters()) // c.n_routed_experts if moe else 0,
                   num_experts=c.n_routed_experts, top_k=c.num_experts_per_tok, num_main_moe_layers=len(moe),
                   lm_head=_nbytes([weight]), embedding_row=weight.shape[1] * weight.element_size(),
                   kv_per_token_layer=c.kv_cache_dim * weight.element_size(), num_main_layers=c.num_hidden_layers)

    def experts_hit(self, num_tokens: float) -> float:
        return min(self.num_experts, num_tokens * self.top_k)

    def decode_step(self, batch: int, context_len: float, drafts_per_seq: float = 0.0) -> float:
        """One engine step: the main pass over batch*(1+drafts) tokens plus, when drafting, one MTP pass per draft
        (each over `batch` tokens, with its own output head)."""
        tokens = batch * (1 + drafts_per_seq)
        main = (self.main_fixed + self.num_main_moe_layers * self.experts_hit(tokens) * self.expert + self.lm_head
                + tokens * self.embedding_row + self.num_main_layers * batch * context_len * self.kv_per_token_layer)
        mtp = (self.mtp_fixed + self.experts_hit(batch) * self.expert + self.lm_head
               + batch * (self.embedding_row + context_len * self.kv_per_token_layer))
        return main + drafts_per_seq * mtp


@dataclass(slots=True)
class StepFlops:
    """Multiply-adds x 2 of one forward pass: every weight read does one per token, plus absorbed attention's
    products with the cached latents."""

    main_per_token: int  # weights each main-pass token multiplies: dense parts, top-k experts, output head
    mtp_per_token: int
    attention_per_key: int  # per token, layer and context position: scores and weighted sum over the latent
    num_main_layers: int

    @classmethod
    def of(cls, model: DeepseekV3ForCausalLM) -> "StepFlops":
        c = model.config

        def per_token(layer) -> int:
            params = sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
            if isinstance(layer.mlp, MoE):
                bank = sum(p.numel() for p in layer.mlp.experts.bank.parameters())
                params += bank * c.num_experts_per_tok // c.n_routed_experts - bank
            return params

        head = model.lm_head.weight.numel()
        return cls(main_per_token=sum(per_token(layer) for layer in model.main_layers) + head,
                   mtp_per_token=(per_token(model.mtp_layers[0]) + head) if model.mtp_layers else 0,
                   attention_per_key=c.num_attention_heads * (c.kv_cache_dim + c.kv_lora_rank),
                   num_main_layers=c.num_hidden_layers)

    def decode_step(self, batch: int, context_len: float, drafts_per_seq: float = 0.0) -> float:
        tokens = batch * (1 + drafts_per_seq)
        main = tokens * (self.main_per_token + self.num_main_layers * context_len * self.attention_per_key)
        mtp = batch * (self.mtp_per_token + context_len * self.attention_per_key)
        return 2 * (main + drafts_per_seq * mtp)

    def generation(self, batch: int, prompt_len: int, new_tokens: int) -> float:
        """A whole run with no speculation: every position but the last passes once, attending to itself and all
        before it (the prompts' positions in their pass, the others one decode step each)."""
        return sum(self.decode_step(batch, context) for context in range(1, prompt_len + new_tokens))


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in `dtype`: what the compute-bound part of a step can hope for."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync(device)
    iters = 20 if device.type == "cuda" else 5
    started = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - started)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large on-device copy, counting the read and the write."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    iters = 20 if device.type == "cuda" else 5
    started = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - started)


# --- runs ----------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_engine(model: DeepseekV3ForCausalLM, batch: int, prompt_len: int, new_tokens: int, spec_tokens: int,
                adaptive: bool, cuda_graphs: bool = True, compile_decode: bool = False) -> Engine:
    return Engine(model, EngineConfig(
        max_num_seqs=batch, num_speculative_tokens=spec_tokens, adaptive_speculation=adaptive,
        cuda_graphs=cuda_graphs, compile_decode=compile_decode,
        max_model_len=prompt_len + new_tokens + spec_tokens + 1,
        # the whole batch prefills in one pass, as transformers does
        max_num_batched_tokens=max(2048, batch * prompt_len)))


def run_tandem(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """One timed generate; the first-token time is when every request has its first token. The engine is reused
    across runs, as a server's is across requests: its speculation policy keeps what it measured."""
    batch, device = len(prompts), engine.device
    engine.spec_totals = SpecStats()
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    sync(device)
    started = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    steps, first_token_at, first_token_step, outputs = 0, None, 0, 0
    while engine.has_unfinished:
        step_outputs = engine.step()
        sync(device)
        steps += 1
        outputs += len(step_outputs)
        for out in step_outputs:
            tokens[out.request_id] += out.new_token_ids
        if first_token_at is None and all(tokens.values()):
            first_token_at, first_token_step = time.perf_counter(), steps
    finished = time.perf_counter()
    return {"seconds": finished - started, "first_token_seconds": first_token_at - started,
            "decode_seconds": finished - first_token_at, "decode_steps": steps - first_token_step,
            "token_ids": [tokens[rid] for rid in ids],
            "spec": spec_summary(engine, outputs - batch) if engine.policy.max_drafts else None}


def spec_summary(engine: Engine, decode_seq_steps: int) -> dict:
    """Totals plus how often each draft count was chosen, per sequence and decode step."""
    totals = engine.spec_totals.to_dict()
    proposed = engine.spec_totals.proposed_by_position + [0]
    chosen = {0: decode_seq_steps - proposed[0]}
    chosen.update({k: proposed[k - 1] - proposed[k] for k in range(1, len(proposed))})
    totals["drafts_chosen"] = {str(k): n for k, n in chosen.items()}
    totals["mean_drafts_per_step"] = totals["draft_tokens"] / decode_seq_steps if decode_seq_steps else 0.0
    return totals


class StepClock:
    """A logits processor that only notes the time: `generate` calls it once per forward pass."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


def run_transformers(hf, prompts: list[list[int]], new_tokens: int, device: torch.device) -> dict:
    from transformers import LogitsProcessorList

    input_ids = torch.tensor(prompts, dtype=torch.int64, device=device)
    clock = StepClock(device)
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          logits_processor=LogitsProcessorList([clock]))
    sync(device)
    finished = time.perf_counter()
    return {"seconds": finished - started, "first_token_seconds": clock.times[0] - started,
            "decode_seconds": finished - clock.times[0], "decode_steps": len(clock.times) - 1,
            "token_ids": out[:, input_ids.shape[1]:].tolist(), "spec": None}


def measure(configs: dict, repeats: int) -> dict:
    """{name: (warm_up, run)} -> {name: the run of median time}. Every configuration is warmed up once, then they
    run in turns, one run each per round, so that a slow spell of this shared machine slows all of them alike and
    their ratios hold."""
    for warm_up, _ in configs.values():
        warm_up()
    runs = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (_, run) in configs.items():
            runs[name].append(run())
    out = {}
    for name, rs in runs.items():
        rs.sort(key=lambda r: r["seconds"])
        out[name] = rs[(len(rs) - 1) // 2]
        out[name]["seconds_all"] = [r["seconds"] for r in rs]
    return out


def with_rates(result: dict, batch: int, new_tokens: int, step_bytes: StepBytes, step_flops: StepFlops,
               context_len: float, bandwidth: float, flops: float) -> dict:
    result["tokens_per_s"] = batch * new_tokens / result["seconds"]
    decode = result["decode_seconds"]
    result["decode_tokens_per_s"] = batch * (new_tokens - 1) / decode if decode > 0 else None
    steps = result["decode_steps"]
    result["step_ms"] = 1e3 * decode / steps if steps else None
    drafts = result["spec"]["mean_drafts_per_step"] if result["spec"] else 0.0
    bound = step_bytes.decode_step(batch, context_len, drafts)
    result["bytes_per_step"] = bound
    result["bandwidth_bound_step_ms"] = 1e3 * bound / bandwidth
    result["step_over_bound"] = result["step_ms"] / result["bandwidth_bound_step_ms"] if steps else None
    result["flops_per_step"] = step_flops.decode_step(batch, context_len, drafts)
    result["compute_bound_step_ms"] = 1e3 * result["flops_per_step"] / flops
    return result


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    equal = [a == b for a, b in zip(tokens, reference)]
    return {"prompts_equal": sum(equal), "prompts": len(equal), "first_prompt_equal": equal[0],
            "first_prompt_divergence": first_divergence(tokens[0], reference[0])}


# --- report --------------------------------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def model_info(model: DeepseekV3ForCausalLM, name: str, dtype: torch.dtype) -> dict:
    c = model.config
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "first_k_dense_replace",
            "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok", "n_group", "topk_group",
            "n_shared_experts", "num_nextn_predict_layers")
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for layer in model.mtp_layers for p in layer.parameters())
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    routed_main = c.n_routed_experts * expert * sum(isinstance(l.mlp, MoE) for l in model.main_layers)
    inactive = routed_main * (1 - c.num_experts_per_tok / c.n_routed_experts) if c.n_routed_experts else 0
    return {"name": name, "dtype": str(dtype).removeprefix("torch."), **{k: getattr(c, k) for k in keys},
            "num_params": total, "num_params_mtp": mtp, "num_params_active_per_token": int(total - mtp - inactive)}


def compute_bounds(results: list[dict], step_flops: StepFlops, prompt_len: int, new_tokens: int,
                   flops: float) -> dict:
    """Per batch size, the seconds a run's multiplies take at the measured matmul peak, and transformers' time over
    that: the most any engine could gain on transformers here without doing less work (a ceiling no real run
    reaches, since a decode step's small matmuls run well below the peak)."""
    out = {}
    for hf in (r for r in results if r["engine"] == "transformers"):
        seconds = step_flops.generation(hf["batch"], prompt_len, new_tokens) / flops
        out[f"B={hf['batch']}"] = {"compute_bound_seconds": seconds, "transformers_over_bound": hf["seconds"] / seconds}
    return out


def speedups(results: list[dict], key: str) -> dict:
    out = {}
    for hf in (r for r in results if r["engine"] == "transformers" and r[key]):
        tandem = [r[key] for r in results if r["engine"] == "tandem" and r["batch"] == hf["batch"] and r[key]]
        if tandem:
            out[f"B={hf['batch']}"] = max(tandem) / hf[key]
    return out


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({(r["engine"], r["spec_tokens"]) for r in results}, key=lambda s: (s[0] == "tandem", s[1]))
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(series)
    for ax, key, label in zip(axes, ("tokens_per_s", "decode_tokens_per_s"),
                              ("generated tokens/s (prefill included)", "decode tokens/s")):
        for i, (engine, k) in enumerate(series):
            values = [next((r[key] or 0 for r in results
                            if (r["engine"], r["spec_tokens"], r["batch"]) == (engine, k, b)), 0) for b in batches]
            name = "transformers" if engine == "transformers" else \
                f"tandem, up to {k} MTP drafts" if k else "tandem, no speculation"
            bars = ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(batches))], values, width,
                          label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_yscale("log")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help=f"checkpoint directory (default: {DEFAULT_MODEL} if it exists, "
                                                   "else --random-preset tiny)")
    source.add_argument("--random-preset", choices=sorted(PRESETS),
                        help="random weights of a preset shape instead of a checkpoint: 'tiny' is written to a temp "
                             "directory; 'moonlight' (Moonlight-16B-A3B's shape, CUDA only) is built on the device")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--batch-sizes", type=ints, default=[1, 8, 32], help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (default 128)")
    p.add_argument("--spec-tokens", type=ints, default=[0, 1, 2, 3],
                   help="Tandem's settings of MTP drafts per step at most, comma-separated (default 0,1,2,3)")
    p.add_argument("--fixed-speculation", action="store_true",
                   help="always draft --spec-tokens tokens instead of letting the engine choose per step")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where both engines run (default cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights and activations (default bfloat16 on cuda, "
                                                            "float32 on cpu)")
    p.add_argument("--skip-transformers", action="store_true", help="run Tandem only")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run Tandem's decode steps eagerly on CUDA (by default it replays them from CUDA graphs "
                        "where the model allows: bfloat16 with grouped expert matmuls)")
    p.add_argument("--no-compile", action="store_true",
                   help="run Tandem's decode steps eagerly on the CPU (by default they run from forwards compiled "
                        "ahead of time there, when each engine starts)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the median is kept")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--out", type=Path, default=Path("bench/results/engine"), help="where results.json and "
                                                                                   "throughput.png go")
    args = p.parse_args(argv)
    if args.model is None and args.random_preset is None:
        if DEFAULT_MODEL.exists():
            args.model = DEFAULT_MODEL
        else:
            args.random_preset = "tiny"
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.random_preset == "moonlight" and args.device != "cuda":
        p.error("--random-preset moonlight needs --device cuda (about 32 GB of bf16 weights)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if min(args.batch_sizes + [args.prompt_len, args.new_tokens, args.repeats]) < 1 or min(args.spec_tokens) < 0:
        p.error("batch sizes, --prompt-len, --new-tokens and --repeats must be >= 1, --spec-tokens >= 0")
    return args


def load_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tmp: Path):
    """The Tandem model, its name, and a function giving the transformers model once Tandem's runs are done."""
    if args.random_preset == "moonlight":
        log("building moonlight-shaped random model on the device")
        model = random_model_on_device(ModelConfig(**PRESETS["moonlight"]), dtype, device, args.seed)
        return model, "random:moonlight", lambda: transformers_from_tandem(model)
    if args.random_preset:
        path = tmp / args.random_preset
        log(f"writing random {args.random_preset} checkpoint to {path}")
        random_checkpoint(ModelConfig(**PRESETS[args.random_preset]), path, dtype, args.seed)
        name = f"random:{args.random_preset}"
    else:
        path, name = args.model, str(args.model)
    model = load_model(path, dtype=dtype, device=device)
    # from a second Tandem copy rather than from the files: transformers cannot run FP8 checkpoints on CPU. Its
    # weights stay row-major, as transformers lays them out itself.
    return model, name, lambda: transformers_from_tandem(load_model(path, dtype=dtype, device=device,
                                                                    column_major=False))


def make_prompts(args: argparse.Namespace, vocab_size: int) -> dict[int, list[list[int]]]:
    """Per batch size, the prompts: windows of the held-out stdlib code for a trained checkpoint (so that MTP
    acceptance, and with it what speculation gains, is what serving code sees), random ids for random weights."""
    if args.model is None:
        g = torch.Generator().manual_seed(args.seed)
        return {b: torch.randint(0, vocab_size, (b, args.prompt_len), generator=g).tolist() for b in args.batch_sizes}
    tokenizer = load_tokenizer(args.model)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer.json: held-out code prompts need the model's tokenizer")
    windows = eval_windows(encode_files(tokenizer, split_corpus().heldout), args.prompt_len,
                           max(args.batch_sizes)).tolist()
    return {b: windows[:b] for b in args.batch_sizes}


def transformers_runs(hf, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple:
    """(warm-up, timed run) of transformers' generate for `measure`."""
    return (lambda: run_transformers(hf, prompts, min(4, new_tokens), device),
            lambda: run_transformers(hf, prompts, new_tokens, device))


def record(results: list[dict], tandem_tokens: dict, name: str, batch: int, spec: int, r: dict, engine) -> dict:
    """A result row's identity and greedy-token comparisons; takes the token ids out of `r`."""
    tokens = r.pop("token_ids")
    row = {"engine": name, "batch": batch, "spec_tokens": spec}
    if name == "tandem":
        tandem_tokens[batch, spec] = tokens
        row["decode_graphs"] = engine.graphs.kind if engine.graphs else "eager"
        row["num_decode_graphs"] = engine.graphs.num_graphs if engine.graphs else 0
        row["num_mtp_graphs"] = sum(g.num_graphs for g in engine.drafter.graphs)
        if spec and (batch, 0) in tandem_tokens:
            r["greedy_vs_tandem_no_spec"] = compare(tokens, tandem_tokens[batch, 0])
    else:
        for t in results:
            if t["batch"] == batch and t["engine"] == "tandem":
                t["greedy_vs_transformers"] = compare(tandem_tokens[batch, t["spec_tokens"]], tokens)
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, name, make_transformers = load_models(args, device, dtype, Path(tmp))
        report = {"machine": machine_info(device), "model": model_info(model, name, dtype),
                  "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        bandwidth = copy_bandwidth(device)
        report["machine"]["copy_bandwidth_gb_s"] = bandwidth / 1e9
        flops = matmul_flops(device, dtype)
        report["machine"]["matmul_tflops"] = flops / 1e12
        step_flops = StepFlops.of(model)
        step_bytes = StepBytes.of(model)
        context_len = args.prompt_len + args.new_tokens / 2  # the mean context over the decode
        prompts = make_prompts(args, model.config.vocab_size)
        report["settings"]["prompts"] = "held-out code" if args.model else "random ids"
        results, tandem_tokens = [], {}

        def add_result(engine_name: str, batch: int, spec: int, r: dict, engine: Engine | None) -> None:
            row = record(results, tandem_tokens, engine_name, batch, spec, r, engine)
            results.append({**row, **with_rates(r, batch, args.new_tokens, step_bytes, step_flops, context_len,
                                                bandwidth, flops)})
            log(f"{engine_name:12} B={batch:<3} spec={spec}: {results[-1]['tokens_per_s']:.1f} tok/s, "
                f"decode {results[-1]['decode_tokens_per_s'] or 0:.1f} tok/s, {r['seconds']:.2f} s")

        spec_settings = args.spec_tokens if model.mtp_layers else [0]
        # transformers runs in turn with Tandem, except for Moonlight, whose weights it takes over
        interleaved = not args.skip_transformers and args.random_preset != "moonlight"
        if interleaved:
            log("loading the transformers model")
            hf = make_transformers()
            report["transformers"] = transformers_info(hf)
        for b in args.batch_sizes:
            configs, engines = {}, {}
            for k in spec_settings:
                engine = engines[k] = make_engine(model, b, args.prompt_len, args.new_tokens, k,
                                                  not args.fixed_speculation, not args.no_cuda_graphs,
                                                  device.type == "cpu" and not args.no_compile)
                run = lambda engine=engine: run_tandem(engine, prompts[b], args.new_tokens)  # noqa: E731
                # a full-length warm-up run: the adaptive policy measures its draft counts there, as a server's
                # does in its first requests
                configs["tandem", k] = (run, run)
            if interleaved:
                configs["transformers", 0] = transformers_runs(hf, prompts[b], args.new_tokens, device)
            log(f"B={b:<3}: {', '.join(f'{e} spec={k}' for e, k in configs)}, {args.repeats} run(s) each in turn ...")
            for (engine_name, k), r in measure(configs, args.repeats).items():
                add_result(engine_name, b, k, r, engines.get(k))
        if not args.skip_transformers and not interleaved:
            log("loading the transformers model")
            hf = make_transformers()
            model = None  # moonlight's weights now live in `hf`
            report["transformers"] = transformers_info(hf)
            for b in args.batch_sizes:
                r = measure({"t": transformers_runs(hf, prompts[b], args.new_tokens, device)}, args.repeats)["t"]
                add_result("transformers", b, 0, r, None)
    # other processes on the machine skew every number: a load average above the core count says so
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["results"] = results
    report["speedup"] = speedups(results, "tokens_per_s")
    report["decode_speedup"] = speedups(results, "decode_tokens_per_s")
    report["compute_bound"] = compute_bounds(results, step_flops, args.prompt_len, args.new_tokens,
                                             report["machine"]["matmul_tflops"] * 1e12)
    report["mismatches"] = [f"tandem B={r['batch']} spec={r['spec_tokens']} vs {other}: {c['prompts_equal']}/"
                            f"{c['prompts']} prompts equal, first prompt diverges at {c['first_prompt_divergence']}"
                            for r in results for other in ("transformers", "tandem_no_spec")
                            if (c := r.get(f"greedy_vs_{other}")) and c["prompts_equal"] < c["prompts"]]
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, f"{name}, {args.dtype}, {report['machine']['device_name']}, prompt {args.prompt_len}, "
                  f"{args.new_tokens} new tokens", args.out / "throughput.png")
    for line in report["mismatches"]:
        log(f"MISMATCH {line}")
    log(f"wrote {args.out / 'results.json'} and {args.out / 'throughput.png'}")
    rates = {f"{r['engine']} B={r['batch']} spec={r['spec_tokens']}": round(r["tokens_per_s"], 1) for r in results}
    print(json.dumps({"speedup": report["speedup"], "decode_speedup": report["decode_speedup"],
                      "speedup_ceiling": {b: round(v["transformers_over_bound"], 1)
                                          for b, v in report["compute_bound"].items()},
                      "tokens_per_s": rates}, indent=2))


def transformers_info(hf) -> dict:
    import transformers

    return {"version": transformers.__version__, "attn_implementation": hf.config._attn_implementation,
            "experts_implementation": getattr(hf.config, "_experts_implementation", None)}


if __name__ == "__main__":
    main()
