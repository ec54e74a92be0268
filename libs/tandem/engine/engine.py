"""The colocated engine: one process, continuous batching, paged MLA cache, MTP speculative decoding.

Each step reads as three verbs: schedule (who runs, how many tokens) -> run (one main pass over every
scheduled token, drafts included) -> postprocess (sample or verify, stop checks, roll back rejected drafts,
catch the MTP modules up and draft for the next step).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from tandem.engine.cpu_threads import single_thread_if_small
from tandem.engine.decode_graphs import DecodeGraphs
from tandem.engine.detokenizer import Detokenizer
from tandem.engine.kv_cache import PagedKVCache
from tandem.engine.sampling import SamplingError, SamplingParams, greedy_tokens, sample, target_probs, verify_drafts
from tandem.engine.scheduler import ScheduledSeq, Scheduler
from tandem.engine.handoff import PrefilledSequence
from tandem.engine.kv_cache import OutOfBlocks
from tandem.engine.sequence import MTPState, Sequence, SpecStats, Status
from tandem.engine.speculative import MTPDrafter, SpeculationPolicy
from tandem.kernels import library
from tandem.kernels.tiles import pack_model_
from tandem.model.attention_metadata import Paged, PagedStep
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM

log = logging.getLogger(__name__)


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # prefill chunk budget per step
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: room for max_num_seqs full-length sequences within kv_cache_bytes
    kv_cache_bytes: int = 2 << 30
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_speculative_tokens: int = 0  # drafts per step at most (per request it may be lower)
    adaptive_speculation: bool = True  # pick 0..num_speculative_tokens drafts per step from measured gains
    # CPU steps feeding at most this many tokens run on one intra-op thread (0: never; see `cpu_threads`)
    single_thread_max_tokens: int = 0
    cuda_graphs: bool = True  # replay decode steps from CUDA graphs where the model allows (`DecodeGraphs`)
    # on the CPU, run decode steps from forwards compiled ahead of time (`DecodeGraphs`) when the engine starts
    compile_decode: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.single_thread_max_tokens < 0:
            raise ValueError(f"single_thread_max_tokens must be >= 0, got {self.single_thread_max_tokens}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")


@dataclass(slots=True)
class StepOutput:
    """What one request gained in one step."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    is_prefilled: bool = False  # a prefill-only request is ready for `take_prefilled`


@dataclass(slots=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    spec: SpecStats = field(default_factory=SpecStats)


class Engine:
    def __init__(self, model: DeepseekV3ForCausalLM, config: EngineConfig | None = None, tokenizer=None):
        self.model = model
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        mc = model.config
        self.max_model_len = min(self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        param = model.lm_head.weight
        self.device, self.dtype = param.device, param.dtype
        num_blocks = self.config.num_kv_blocks or min(
            self.config.max_num_seqs * -(-self.max_model_len // self.config.block_size),
            self.config.kv_cache_bytes // PagedKVCache.bytes_per_block(mc, self.config.block_size, self.dtype))
        self.cache = PagedKVCache(mc, num_blocks, self.config.block_size, self.dtype, self.device)
        if self.device.type == "cpu" and library.load():
            # attention, matmuls of a few rows and layer operations run in its kernels, over weights packed for them
            log.info("packed the weights of %d modules for the CPU kernels", pack_model_(model))
        self.scheduler = Scheduler(self.cache, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        max_drafts = self.config.num_speculative_tokens if mc.num_nextn_predict_layers else 0
        self.policy = SpeculationPolicy(max_drafts, adaptive=self.config.adaptive_speculation)
        self.drafter = MTPDrafter(model, self.cache)
        self.graphs: DecodeGraphs | None = None
        kind = self._decode_graph_kind(model)
        if kind is not None:
            self.use_decode_graphs(kind)
        self.stop_ids = set(mc.eos_token_id)
        self._requests: dict[str, tuple[Sequence, Detokenizer | None]] = {}
        self._ids = itertools.count()
        self.spec_totals = SpecStats()
        log.info("engine ready: %d KV blocks of %d tokens, max_model_len %d, up to %d drafts/step from %d MTP "
                 "module(s), decode steps %s", num_blocks, self.config.block_size, self.max_model_len, max_drafts,
                 mc.num_nextn_predict_layers, f"from {self.graphs.kind} graphs" if self.graphs else "eager")

    def _decode_graph_kind(self, model: DeepseekV3ForCausalLM) -> str | None:
        """CUDA graphs where the model allows them and they are on; on the CPU, compiled steps where asked for."""
        c = self.config
        if c.cuda_graphs and DecodeGraphs.supports(model, "cuda"):
            return "cuda"
        if not c.compile_decode:
            return None
        if self.device.type != "cpu" or not DecodeGraphs.supports(model, "compiled"):
            log.warning("compile_decode is for an engine on the CPU whose experts are local: decode steps run "
                        "eagerly")
            return None
        return "compiled"

    def use_decode_graphs(self, kind: str) -> None:
        """Run decode steps from graphs of `kind` (see `DecodeGraphs`; "eager" checks their padding), and, except
        compiled, the passes of the MTP modules the drafts come from. CUDA graphs are captured when first needed;
        compiled ones are built now, 15-30 s per class of shapes on 2 cores, about 50 s in bfloat16 on a CPU
        with AMX (`aot_passes.packs_weights`), seconds when cached.

        Compiled MTP passes did not pay on the CPU: a decode step of one sequence is bound by the bytes it reads,
        and one verifying a draft reads more experts, plus an MTP pass and the output head again, about the bytes
        per token of a plain step. With the bundled model, one sequence and MTP passes compiled ahead of time as
        well, a step verifying one draft took 3.2 ms against 1.65 ms for a plain step, for 1.73 tokens (73% of
        the drafts accepted): no gain, for more libraries to build at start-up (per MTP module, token count and
        batch class). In bfloat16 on AMX with packed weights (`aot_passes.packs_weights`), 128 tokens of one
        sequence took 0.256 s drafting one token every step (94% accepted) against 0.222 s without drafts."""
        c, drafts = self.config, self.policy.max_drafts
        self.graphs = DecodeGraphs(self.model, self.cache, c.max_num_seqs, self.max_model_len, 1 + drafts, kind)
        if kind == "compiled":
            with torch.inference_mode():  # as steps run: a graph compiled outside it would not serve them
                self.graphs.warm_up()
            return
        # module m's pass: the positions the main pass just verified (up to 1 + drafts), and, chained, its m draft
        # positions (m < drafts)
        self.drafter.graphs = [
            DecodeGraphs(self.model, self.cache, c.max_num_seqs, self.max_model_len, 2 * drafts, kind, mtp_module=m,
                         scratch_slot=self.graphs.scratch_slot)
            for m in range(min(drafts, self.drafter.num_modules))]

    @property
    def num_graphs(self) -> int:
        """Graphs built so far, of the main pass and the MTP modules'."""
        return sum(g.num_graphs for g in [*([self.graphs] if self.graphs else []), *self.drafter.graphs])

    # --- requests -------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    num_speculative_tokens: int | None = None, prefill_only: bool = False,
                    prefilled: bool = False, mtp_modules: int | None = None) -> str:
        """Queue a request; raises SamplingError naming the bad field.

        A `prefill_only` request stops after its first token and keeps its KV cache for `take_prefilled`
        (a prefill worker handing the sequence to a decode worker); `prefilled` registers a request that
        `add_prefilled` queues itself. `mtp_modules` keeps only the first that many MTP modules for the request
        (`Sequence.keep_mtp_modules`): a prefill worker catches only those up on the prompt. Left None, a prefill
        worker keeps them all, and a request served here from start to end keeps those its speculation policy
        drafts from at the batch size it will decode in (`_settle_mtp_modules`): where the policy has settled on
        no drafts, its prompt runs through no MTP module. Such a request does not draft later, should the batch
        shrink. A seeded sampled request keeps them all, since it drafts the same counts wherever it runs."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise SamplingError(f"request_id {request_id!r} is already running")
        if not prompt_ids:
            raise SamplingError("prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        bad = next((t for t in prompt_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise SamplingError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise SamplingError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                                f"model's context of {self.max_model_len} tokens")
        if -(-(len(prompt_ids) + params.max_tokens) // self.cache.block_size) > self.cache.allocator.num_blocks:
            raise SamplingError("prompt + max_tokens does not fit in the KV cache pool")
        if params.stop and self.tokenizer is None:
            raise SamplingError("stop strings need a tokenizer; this model directory has no tokenizer.json")
        if num_speculative_tokens is not None and num_speculative_tokens < 0:
            raise SamplingError(f"num_speculative_tokens must be >= 0, got {num_speculative_tokens}")
        if mtp_modules is not None and mtp_modules < 0:
            raise SamplingError(f"mtp_modules must be >= 0, got {mtp_modules}")
        max_drafts = self.policy.max_drafts if num_speculative_tokens is None \
            else min(num_speculative_tokens, self.policy.max_drafts)
        seq = Sequence(request_id, prompt_ids, params, max_drafts, len(self.model.mtp_layers))
        seq.prefill_only = prefill_only
        seq.settles_mtp_modules = mtp_modules is None and not (prefill_only or prefilled or seq.pins_drafts)
        if mtp_modules is not None and not (prefill_only and seq.pins_drafts):
            seq.keep_mtp_modules(mtp_modules)
        bad = next((t for t in params.allowed_first_tokens if t >= vocab), None)
        if bad is not None:
            raise SamplingError(f"allowed_first_tokens holds {bad}, outside the vocabulary [0, {vocab})")
        detok = Detokenizer(self.tokenizer, params.stop, params.skip_text_prefix) \
            if self.tokenizer is not None else None
        self._requests[request_id] = (seq, detok)
        if not prefilled:
            self.scheduler.add(seq)
        return request_id

    def take_prefilled(self, request_id: str) -> PrefilledSequence:
        """Hand over a prefilled request: its prompt's KV rows, first token, MTP state and sampling RNG state.
        Its blocks are freed here."""
        entry = self._requests.get(request_id)
        if entry is None or entry[0].status is not Status.PREFILLED:
            raise KeyError(f"request {request_id!r} is not a prefilled request waiting for handoff")
        seq = entry[0]
        # a module with no verified position yet has no tail: zeros stand in (valid_len 0 says so)
        tails = [m.tail if m.tail is not None else torch.zeros(1, self.model.config.hidden_size, device=self.device,
                                                               dtype=self.dtype) for m in seq.mtp]
        handoff = PrefilledSequence(
            request_id=request_id, prompt_ids=seq.token_ids[: seq.num_prompt_tokens],
            first_token=seq.token_ids[seq.num_prompt_tokens], kv=self.cache.read(seq.block_table, seq.num_cached),
            mtp_valid_lens=[m.valid_len for m in seq.mtp],
            mtp_tails=torch.cat(tails) if tails else None,
            rng_state=seq.generator.get_state() if seq.generator is not None else None)
        self.scheduler.finish(seq, "handed_off")
        del self._requests[request_id]
        return handoff

    def add_prefilled(self, handoff: PrefilledSequence, params: SamplingParams,
                      num_speculative_tokens: int | None = None) -> str:
        """Continue a request another engine prefilled: its KV is written into this engine's cache and it joins
        the running batch at its next step. Raises OutOfBlocks when the pool cannot hold it now."""
        mc = self.model.config
        num_prompt = len(handoff.prompt_ids)
        expected = (mc.num_kv_layers, num_prompt, mc.kv_cache_dim)
        if tuple(handoff.kv.shape) != expected:
            raise SamplingError(f"prefilled KV has shape {tuple(handoff.kv.shape)}, expected {expected}")
        if params.max_tokens <= 1:
            raise SamplingError("a prefilled request has its first token already; max_tokens must be > 1")
        request_id = self.add_request(handoff.prompt_ids, params, handoff.request_id, num_speculative_tokens,
                                      prefilled=True, mtp_modules=len(handoff.mtp_valid_lens))
        seq = self._requests[request_id][0]
        seq.token_ids.append(handoff.first_token)
        if not self.cache.ensure_capacity(seq.block_table, seq.num_tokens):
            del self._requests[request_id]
            raise OutOfBlocks(f"no room for the {seq.num_tokens} tokens of prefilled request {request_id}")
        self.cache.write(seq.block_table, handoff.kv)
        seq.num_cached = num_prompt
        if handoff.mtp_tails is not None:  # the modules the prefill worker caught up (seq keeps no more)
            tails = handoff.mtp_tails.to(self.device, self.dtype).split(1)
            seq.mtp = [MTPState(v, t if v else None) for v, t in zip(handoff.mtp_valid_lens, tails)][: len(seq.mtp)]
        if seq.generator is not None and handoff.rng_state is not None:
            seq.generator.set_state(handoff.rng_state)
        if seq.can_draft and seq.mtp[0].valid_len == seq.num_tokens - 1:
            # draft now, as the colocated engine does right after the first token: the first decode step
            # verifies drafts too, and a seeded request draws the same random numbers as it would colocated
            k = self.policy.choose(len(self.scheduler.running) + 1)
            self.drafter.advance([seq], [(seq.mtp[0].valid_len, seq.mtp[0].tail[:0])], [self._draft_count(seq, k)])
        self.scheduler.add(seq, front=True)  # it already holds its blocks
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; False if it is unknown or already done."""
        entry = self._requests.pop(request_id, None)
        if entry is None:
            return False
        self.scheduler.finish(entry[0], "cancelled")
        return True

    def spec_stats(self, request_id: str) -> SpecStats:
        """The live speculative-decoding counters of a running request."""
        entry = self._requests.get(request_id)
        if entry is None:
            raise KeyError(f"request {request_id!r} is not running")
        return entry[0].spec

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_free_blocks(self) -> int:
        return self.cache.allocator.num_free

    # --- the step -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self._settle_mtp_modules(batch)
        started = time.perf_counter()
        timed_drafts = self._uniform_decode_drafts(batch) if self.policy.measures else None
        graphs_before = self.num_graphs
        with single_thread_if_small(sum(s.num_fed for s in batch), self.config.single_thread_max_tokens,
                                    self.device):
            hidden, logits = self._run_main(batch)
            outputs, verified = self._postprocess(batch, hidden, logits)
            if self.num_graphs > graphs_before:
                timed_drafts = None  # this step's time includes capturing a CUDA graph: not what its drafts cost
            if self.policy.measures:
                self.policy.record_verify(timed_drafts, len(batch), time.perf_counter() - started)
            self._speculate(hidden, verified, timed=timed_drafts is not None)
        return outputs

    @staticmethod
    def _uniform_decode_drafts(batch: list[ScheduledSeq]) -> int | None:
        """The drafts each sequence verifies when this is a pure decode step with one draft count for all (a step
        whose time tells the speculation policy what that count costs), else None."""
        counts = {len(s.draft_ids) for s in batch}
        pure = len(counts) == 1 and all(s.num_new == 1 and s.samples for s in batch)
        return counts.pop() if pure else None

    def _run_main(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The main pass over the batch's tokens: hidden states [T, D], and logits [T, V] where a graph ran the
        output head too."""
        ids = [t for s in batch for t in s.seq.token_ids[s.seq.num_cached:s.seq.num_cached + s.num_new] + s.draft_ids]
        fed = [s.num_fed for s in batch]
        step = PagedStep(fed, [s.seq.num_cached + n for s, n in zip(batch, fed)], [s.seq.block_table for s in batch],
                         self.cache.block_size)
        graphed = self.graphs.run(ids, step) if self.graphs is not None else None
        if graphed is not None:
            return graphed
        return self.model(torch.tensor(ids, dtype=torch.int64, device=self.device),
                          Paged.from_arrays(step.arrays(), self.cache.tensor)), None

    def _postprocess(self, batch: list[ScheduledSeq], hidden: torch.Tensor, logits: torch.Tensor | None) \
            -> tuple[list[StepOutput], list[tuple[Sequence, int, slice]]]:
        """Sample or verify, emit; returns the outputs and, per unfinished sequence, what the main pass verified
        (first new position, its rows of `hidden`) for the MTP modules to catch up on."""
        fed = [s.num_fed for s in batch]
        ends = list(itertools.accumulate(fed))  # one past each sequence's rows of `hidden`
        samples = [s.samples for s in batch]
        new_tokens = self._accept([(s, end) for s, end, sampling in zip(batch, ends, samples) if sampling], hidden,
                                  logits)
        outputs: list[StepOutput] = []
        verified: list[tuple[Sequence, int, slice]] = []  # seq, first new position, hidden rows verified
        speculating = self.policy.max_drafts > 0  # else nothing reads `verified`
        for s, end, num_fed, sampling in zip(batch, ends, fed, samples):
            seq, start, first_row = s.seq, s.seq.num_cached, end - num_fed
            if not sampling:
                seq.num_cached += s.num_new
                if speculating:
                    verified.append((seq, start, slice(first_row, end)))
                continue
            tokens = new_tokens[id(seq)]
            seq.num_cached += s.num_new + len(tokens) - 1  # the fed tokens whose successors are now known
            if speculating:
                verified.append((seq, start, slice(first_row, first_row + s.num_new + len(tokens) - 1)))
            outputs.append(self._emit(seq, tokens))
        return outputs, [v for v in verified if not v[0].is_finished]

    def _accept(self, sampling: list[tuple[ScheduledSeq, int]], hidden: torch.Tensor,
                logits: torch.Tensor | None) -> dict[int, list[int]]:
        """New tokens per sequence: a sample from the last logits, or the accepted drafts plus one token from
        the main model. Greedy sequences take the argmax and keep their drafts up to the first that differs from
        it; sampled ones are sampled in one batch, or rejection-sampled per sequence when they drafted.
        `sampling`: the sequences that sample, each with the end of its rows of `hidden` (and of `logits`, when
        the main pass gave them)."""
        if not sampling:
            return {}
        counts = [len(s.draft_ids) + 1 for s, _ in sampling]
        source = hidden if logits is None else logits
        if sum(counts) < source.shape[0]:  # else every row samples (a decode step): no gather
            rows = [row for (_, end), n in zip(sampling, counts) for row in range(end - n, end)]
            source = source.index_select(0, torch.tensor(rows, device=source.device))
        logits = self.model.logits(source) if logits is None else source
        self._constrain_first_tokens(logits, [s.seq for s, _ in sampling], counts)
        out: dict[int, list[int]] = {}
        rows = list(itertools.accumulate(counts, initial=0))
        greedy: list[int] = []
        sampled: list[int] = []
        for i, (s, _) in enumerate(sampling):
            (greedy if s.seq.params.is_greedy else sampled).append(i)
        if greedy:
            # argmax: the lowest index on ties, as target_probs' one-hot rows
            best = greedy_tokens(logits)
            for i in greedy:
                s = sampling[i][0]
                if not s.draft_ids:
                    out[id(s.seq)] = [best[rows[i]]]
                    continue
                target = best[rows[i]:rows[i + 1]]
                accepted = next((j for j, d in enumerate(s.draft_ids) if d != target[j]), len(s.draft_ids))
                out[id(s.seq)] = target[: accepted + 1]
                self._record_acceptance(s.seq, len(s.draft_ids), accepted)
        if not sampled:
            return out
        probs = target_probs(logits[torch.cat([torch.arange(rows[i], rows[i + 1]) for i in sampled])],
                             [sampling[i][0].seq.params for i in sampled for _ in range(counts[i])])
        per_seq = dict(zip(sampled, probs.split([counts[i] for i in sampled])))
        plain = [i for i in sampled if not sampling[i][0].draft_ids]
        if plain:
            tokens = sample(torch.cat([per_seq[i] for i in plain]), [sampling[i][0].seq.generator for i in plain])
            out.update((id(sampling[i][0].seq), [t]) for i, t in zip(plain, tokens.tolist()))
        for i in sampled:
            s, p = sampling[i][0], per_seq[i]
            if not s.draft_ids:
                continue
            seq = s.seq
            draft = torch.tensor([s.draft_ids], dtype=torch.int64, device=p.device)
            q = seq.draft_probs[None] if seq.draft_probs is not None else None
            num_accepted, tokens = verify_drafts(p[None], q, draft, [seq.generator])
            accepted = int(num_accepted[0])
            self._record_acceptance(seq, len(s.draft_ids), accepted)
            out[id(seq)] = tokens[0, : accepted + 1].tolist()
        return out

    def _record_acceptance(self, seq: Sequence, num_drafts: int, num_accepted: int) -> None:
        seq.spec.record(num_drafts, num_accepted)
        self.spec_totals.record(num_drafts, num_accepted)
        self.policy.observe(num_drafts, num_accepted)

    @staticmethod
    def _constrain_first_tokens(logits: torch.Tensor, seqs: list[Sequence], counts: list[int]) -> None:
        """In place: a sequence's first generated token only from its `allowed_first_tokens` (token healing).
        A first token is never drafted, so it is the sequence's only row."""
        row = 0
        for seq, n in zip(seqs, counts):
            allowed = seq.params.allowed_first_tokens
            if allowed and seq.num_output_tokens == 0:
                keep = torch.tensor(allowed, dtype=torch.int64, device=logits.device)
                masked = torch.full_like(logits[row], float("-inf"))
                logits[row] = masked.index_copy_(0, keep, logits[row].index_select(0, keep))
            row += n

    def _emit(self, seq: Sequence, new_tokens: list[int]) -> StepOutput:
        """Append tokens one by one until a stop condition; tokens after a stop are dropped."""
        if seq.draft_ids:
            seq.draft_ids, seq.draft_probs = [], None
        params, detok = seq.params, self._requests[seq.request_id][1]
        emitted, text, reason = [], "", None
        token_ids, last_output = seq.token_ids, seq.num_prompt_tokens + params.max_tokens
        for token in new_tokens:
            token_ids.append(token)
            emitted.append(token)
            if detok is not None:
                piece, hit_stop = detok.add(token)
                text += piece
                if hit_stop:
                    reason = "stop"
            if reason is None and not params.ignore_eos and token in self.stop_ids:
                reason = "stop"
            if reason is None and token in params.stop_token_ids:
                reason = "stop"
            if reason is None and len(token_ids) >= last_output:
                reason = "length"
            if reason:
                break
        # the cache may not hold more than the tokens kept; roll back what the rejected drafts wrote
        seq.num_cached = min(seq.num_cached, len(token_ids) - 1)
        if reason:
            if detok is not None:
                text += detok.flush()
            self.scheduler.finish(seq, reason)
            self._requests.pop(seq.request_id, None)
            return StepOutput(seq.request_id, emitted, text, True, reason)
        self.cache.shrink(seq.block_table, len(token_ids))
        if seq.prefill_only:
            seq.status = Status.PREFILLED
            self.scheduler.running.remove(seq)
        return StepOutput(seq.request_id, emitted, text, False, None, is_prefilled=seq.prefill_only)

    def _speculate(self, hidden: torch.Tensor, verified: list[tuple[Sequence, int, slice]], timed: bool) -> None:
        """Catch the MTP modules up on what the main model verified (`_postprocess`'s rows of the main pass's
        `hidden`), then draft for the next step. `timed`: this was a pure decode step, whose MTP work tells the
        policy what drafting costs."""
        if self.policy.max_drafts == 0:
            return
        started = time.perf_counter()
        # a prefill worker's sequences never draft here: the policy is for decoding batches
        batch_size = sum(not s.prefill_only for s in self.scheduler.running)
        k = self.policy.choose(batch_size) if batch_size else 0
        timed = timed and k > 0 and self.policy.measures
        graphs_before = self.num_graphs if timed else 0
        drafted = self._draft(hidden, verified, k)
        if self.policy.measures:
            # not a drafting time: one that includes capturing a CUDA graph
            timed = timed and drafted and self.num_graphs == graphs_before
            self.policy.record_draft(k if timed else None, batch_size, time.perf_counter() - started)

    def _draft(self, hidden: torch.Tensor, verified: list[tuple[Sequence, int, slice]], k: int) -> bool:
        """`_speculate`'s MTP work for k drafts; whether any ran. A sequence's hidden rows are sliced only if its
        modules run (with no drafts, usually none do)."""
        if k > 0:
            self._resync_stale()
        verified = [v for v in verified if v[0].can_draft]
        # the modules k drafts need, no more: a count being measured runs as it would once chosen (the MTP passes of
        # other counts would slow the main pass too, through the caches). Skipping a module's pass saves its cost; a
        # sequence that needs it again resyncs (see _resync_stale).
        num_modules = self.drafter.num_modules
        modules = min(k, num_modules)
        for seq, _, _ in verified:
            if not (modules or seq.pins_drafts or seq.prefill_only):
                seq.mtp_stale = True
        verified = [v for v in verified if not v[0].mtp_stale]
        if not verified:
            return False
        seqs = [v[0] for v in verified]
        counts = [self._draft_count(s, k) for s in seqs]
        # a prefill worker hands every module its sequence keeps over caught up; a pinned sequence drafts its own
        # count
        needed = max([modules] + [min(c, num_modules) for c in counts] + [len(s.mtp) for s in seqs if s.prefill_only])
        self.drafter.advance(seqs, [(start, hidden[rows]) for _, start, rows in verified], counts, needed)
        return True

    def mtp_modules_for_arrival(self) -> int:
        """MTP modules a request joining the batch now should arrive with caught up on its prompt (what a decode
        worker asks of the prefill worker)."""
        return self._mtp_modules_at(len(self.scheduler.running) + len(self.scheduler.waiting) + 1)

    def _settle_mtp_modules(self, batch: list[ScheduledSeq]) -> None:
        """Sequences scheduled for the first time (their prefill starts now) that settle their MTP modules here
        keep those the policy drafts from at the batch size of every request now in the engine: a burst of
        requests decodes together."""
        starting = [s.seq for s in batch if s.seq.settles_mtp_modules]
        if starting:
            keep = self._mtp_modules_at(len(self.scheduler.running) + len(self.scheduler.waiting))
            for seq in starting:
                seq.keep_mtp_modules(keep)
                seq.settles_mtp_modules = False

    def _mtp_modules_at(self, batch_size: int) -> int:
        """The MTP modules the drafts the policy takes at `batch_size` need; all the drafts may need while that
        batch size is still being measured, or without an adaptive policy."""
        return min(self.policy.drafts_in_use(batch_size), self.drafter.num_modules)

    def _draft_count(self, seq: Sequence, k: int) -> int:
        """Drafts for seq this step: k (a pinned sequence: its own count), within what it may still generate and
        what its KV blocks can hold."""
        wanted = seq.max_drafts if seq.pins_drafts else min(k, seq.max_drafts)
        wanted = min(wanted, self.drafter.max_drafts or wanted)
        n = min(wanted, seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens - 1)
        if n <= 0 or seq.prefill_only or not self.cache.ensure_capacity(seq.block_table, seq.num_tokens + n):
            return 0
        return n

    def _resync_stale(self) -> None:
        """Speculation pays again: stale sequences draft again if recomputing their lag costs no more than the
        tokens they still have to generate."""
        for seq in self.scheduler.running:
            if not seq.mtp_stale or seq.max_drafts == 0:
                continue
            if seq.mtp_lag <= seq.params.max_tokens - seq.num_output_tokens:
                seq.resync_mtp()

    # --- convenience ----------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 num_speculative_tokens: int | None = None) -> list[Completion]:
        """Run prompts to completion (offline use, tests, benchmarks)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp, num_speculative_tokens=num_speculative_tokens)
               for p, sp in zip(prompts, params_list)]
        seqs = {rid: self._requests[rid][0] for rid in ids}
        texts = {rid: "" for rid in ids}
        while self.has_unfinished:
            for out in self.step():
                if out.request_id in texts:
                    texts[out.request_id] += out.new_text
        return [Completion(rid, seqs[rid].token_ids[: seqs[rid].num_prompt_tokens], seqs[rid].output_ids,
                           texts[rid], seqs[rid].finish_reason, seqs[rid].spec) for rid in ids]
