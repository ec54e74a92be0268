"""MTP speculative decoding: keeping the MTP modules' caches in step with the main model, drafting, and
choosing how many drafts pay.

Positions, for a sequence with n known tokens x_0..x_{n-1} (after a step, the main cache holds 0..n-2):
- MTP module m at position p reads the hidden state of module m-1 (the main model for m = 0) at p and the
  token x_{p+m+1}, and predicts x_{p+m+2} (DeepSeek-V3's causal chain). Its verified entries end at
  n-2-m, since later ones would need draft tokens.
- Catch-up: after each step, module m computes its new verified positions (one pass per module, batched).
  Module 0's output at n-2 gives the first draft.
- Draft j <= D (D = modules in the checkpoint) comes from module j-1 at position n-2; it first fills that
  module's positions n-j..n-2, whose tokens are drafts 1..j-1. Draft j > D reuses the last module one
  position further on, fed its own previous output (as vLLM and SGLang do with one MTP layer).
Entries written from drafts are overwritten by the next catch-up.

Meta-style parallel heads (`mtp_head_type = "meta"`) all read the main model's hidden state, so every module
catches up to n-2 from it, and draft j is module j-1's prediction there: at most D drafts, no extra passes.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from tandem.engine.kv_cache import PagedKVCache
from tandem.engine.sampling import sample, target_probs
from tandem.engine.sequence import Sequence
from tandem.model.attention_metadata import Paged
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM


@dataclass(slots=True)
class MTPWork:
    """One sequence's share of one MTP pass: positions [start, start + len(token_ids)) of one module."""

    seq: Sequence
    start: int
    token_ids: list[int]
    hidden: torch.Tensor  # [len(token_ids), D] previous module's (or main model's) hidden at those positions


class StepCostModel:
    """Seconds per forward pass as a linear function of its token count, fitted on recent passes."""

    def __init__(self, window: int = 64):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def record(self, num_tokens: int, seconds: float) -> None:
        self.samples.append((num_tokens, seconds))

    @property
    def calibrated(self) -> bool:
        return len({t for t, _ in self.samples}) >= 2

    def predict(self, num_tokens: int) -> float:
        xs = torch.tensor([t for t, _ in self.samples], dtype=torch.float64)
        ys = torch.tensor([s for _, s in self.samples], dtype=torch.float64)
        if not self.calibrated:
            return float(ys.mean()) if len(ys) else 0.0
        x_mean, y_mean = xs.mean(), ys.mean()
        slope = max(float(((xs - x_mean) * (ys - y_mean)).sum() / ((xs - x_mean) ** 2).sum()), 0.0)
        return max(float(y_mean + slope * (num_tokens - x_mean)), 1e-9)


class SpeculationPolicy:
    """Picks the number of drafts per step that maximises expected tokens per second.

    Expected tokens per sequence with k drafts: 1 + sum_j prod_{i<=j} a_i, a_i being the measured acceptance
    of draft i given the earlier ones were accepted. Cost: the main pass over B*(k+1) tokens plus the MTP
    passes, both from measured pass times. At large batch a pass costs in proportion to its tokens, so k
    falls to 0 and speculation switches itself off; at small batch passes are nearly free and k grows.
    """

    def __init__(self, max_drafts: int, adaptive: bool = True, prior_acceptance: float = 0.7, decay: float = 0.05):
        self.max_drafts = max_drafts
        self.adaptive = adaptive
        self.acceptance = [prior_acceptance] * max_drafts
        self.decay = decay
        self.main_cost = StepCostModel()
        self.mtp_cost = StepCostModel()
        self._explored = 0

    @property
    def exploring(self) -> bool:
        """Still measuring pass costs: a step without drafts keeps the MTP caches warm instead of going stale."""
        return self.adaptive and not (self.main_cost.calibrated and self.mtp_cost.calibrated)

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        for j in range(min(num_drafts, num_accepted + 1)):
            self.acceptance[j] += self.decay * (float(j < num_accepted) - self.acceptance[j])

    def expected_tokens(self, k: int) -> float:
        total, run = 1.0, 1.0
        for a in self.acceptance[:k]:
            run *= a
            total += run
        return total

    def choose(self, batch_size: int) -> int:
        if not self.adaptive or self.max_drafts == 0:
            return self.max_drafts
        if self.exploring:
            # vary the drafts, 0 included, so the pass costs are measured at several sizes
            self._explored += 1
            return self.max_drafts - self._explored % (self.max_drafts + 1)
        best_k, best_rate = 0, batch_size / self.main_cost.predict(batch_size)
        for k in range(1, self.max_drafts + 1):
            cost = self.main_cost.predict(batch_size * (k + 1)) + k * self.mtp_cost.predict(batch_size)
            rate = batch_size * self.expected_tokens(k) / cost
            if rate > best_rate * 1.02:  # a draft must pay clearly, or it is not worth the risk
                best_k, best_rate = k, rate
        return best_k


class MTPDrafter:
    """Runs the MTP modules for a batch: catch-up after the main pass, then drafting."""

    def __init__(self, model: DeepseekV3ForCausalLM, cache: PagedKVCache, policy: SpeculationPolicy):
        self.model = model
        self.cache = cache
        self.policy = policy
        self.num_modules = len(model.mtp_layers)
        self.parallel = model.config.mtp_head_type == "meta"

    @property
    def max_drafts(self) -> int | None:
        """Parallel heads cannot be chained past the last one; None = no limit."""
        return self.num_modules if self.parallel else None

    def _run(self, module: int, work: list[MTPWork]) -> list[torch.Tensor]:
        """One batched pass of MTP module `module`; returns each sequence's output hidden states."""
        meta = Paged.build(
            query_lens=[len(w.token_ids) for w in work],
            context_lens=[w.start + len(w.token_ids) for w in work],
            block_tables=[w.seq.block_table for w in work],
            block_size=self.cache.block_size, kv_cache=self.cache.tensor)
        device = self.cache.tensor.device
        ids = torch.tensor([t for w in work for t in w.token_ids], dtype=torch.int64, device=device)
        hidden = torch.cat([w.hidden for w in work])
        started = time.perf_counter()
        out = self.model.mtp_forward(module, ids, hidden, meta)
        self.policy.mtp_cost.record(len(ids), time.perf_counter() - started)
        return list(out.split([len(w.token_ids) for w in work]))

    def catch_up(self, seqs: list[Sequence], main_hidden: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor | None]:
        """Advance every module's verified entries; main_hidden[i] = (first position, hidden rows) the main pass
        verified for seqs[i]. Returns module 0's output at n-2 for sequences ready to draft, else None."""
        main_sources = [(start, self.model.mtp_hidden_from_main(h)) for start, h in main_hidden]
        sources = main_sources
        for m in range(self.num_modules):
            lag = 0 if self.parallel else m
            work, owners = [], []
            # what module m+1 can read if module m gains nothing this time: module m's last verified output
            next_sources = [(s.mtp[m].valid_len - 1, s.mtp[m].tail) if s.mtp[m].tail is not None
                            else (s.mtp[m].valid_len, sources[0][1][:0]) for s in seqs]
            for i, seq in enumerate(seqs):
                src_start, src = sources[i]
                state = seq.mtp[m]
                start, end = state.valid_len, min(src_start + len(src), seq.num_tokens - 1 - lag)
                if start < src_start:
                    seq.mtp_stale = True  # the hidden states this module needs are gone
                    continue
                if end <= start:
                    continue
                tokens = seq.token_ids[start + lag + 1:end + lag + 1]
                work.append(MTPWork(seq, start, tokens, src[start - src_start:end - src_start]))
                owners.append(i)
            for i, w, out in zip(owners, work, self._run(m, work) if work else []):
                state = seqs[i].mtp[m]
                prev_tail = state.tail
                # the next module reads this one's outputs from the position before the new ones on
                next_sources[i] = (w.start - 1, torch.cat([prev_tail, out])) if prev_tail is not None \
                    else (w.start, out)
                state.valid_len, state.tail = w.start + len(w.token_ids), out[-1:]
            sources = main_sources if self.parallel else next_sources
        return [seq.mtp[0].tail if seq.mtp and seq.mtp[0].valid_len == seq.num_tokens - 1 and not seq.mtp_stale
                else None for seq in seqs]

    def draft(self, seqs: list[Sequence], first_hidden: list[torch.Tensor], num_drafts: list[int]) -> None:
        """Fill seq.draft_ids (and draft_probs when sampling) with num_drafts[i] tokens each."""
        for seq in seqs:
            seq.draft_ids, seq.draft_probs = [], None
        probs_by_seq: dict[int, list[torch.Tensor]] = {id(s): [] for s in seqs}
        prev = dict(zip(map(id, seqs), first_hidden))  # previous draft step's outputs per sequence
        self._sample_drafts(seqs, first_hidden, 0, probs_by_seq)
        for j in range(2, max(num_drafts, default=0) + 1):
            active = [s for s, k in zip(seqs, num_drafts) if k >= j]
            m = min(j, self.num_modules) - 1
            if self.parallel:  # every head already predicted from the main model's state at n-2
                self._sample_drafts(active, [s.mtp[m].tail for s in active], m, probs_by_seq)
                continue
            work = []
            for seq in active:
                if j <= self.num_modules:  # module m re-fills positions n-1-m..n-2, whose tokens are drafts
                    tail = seq.mtp[m - 1].tail
                    hidden = tail if m == 1 else torch.cat([tail, prev[id(seq)]])
                    work.append(MTPWork(seq, seq.num_tokens - 1 - m, seq.draft_ids[:m], hidden))
                else:  # reuse the last module one position further on
                    start = seq.num_tokens - 2 + (j - self.num_modules)
                    work.append(MTPWork(seq, start, seq.draft_ids[-1:], prev[id(seq)][-1:]))
            outs = self._run(m, work)
            for seq, out in zip(active, outs):
                prev[id(seq)] = out
            self._sample_drafts(active, [o[-1:] for o in outs], m, probs_by_seq)
        for seq, k in zip(seqs, num_drafts):
            del seq.draft_ids[k:]
            if not seq.params.is_greedy and seq.draft_ids:
                seq.draft_probs = torch.cat(probs_by_seq[id(seq)][:k])

    def _sample_drafts(self, seqs: list[Sequence], hidden: list[torch.Tensor], module: int,
                       probs_by_seq: dict[int, list[torch.Tensor]]) -> None:
        logits = self.model.mtp_logits(module, torch.cat(hidden))
        probs = target_probs(logits, [s.params for s in seqs])
        tokens = sample(probs, [s.generator for s in seqs])
        for i, seq in enumerate(seqs):
            seq.draft_ids.append(int(tokens[i]))
            probs_by_seq[id(seq)].append(probs[i:i + 1])
