"""MTP speculative decoding: keeping the MTP modules' caches in step with the main model, drafting, and
choosing how many drafts pay.

Positions, for a sequence with n known tokens x_0..x_{n-1} (after a step, the main cache holds 0..n-2):
- MTP module m at position p reads the hidden state of module m-1 (the main model for m = 0) at p and the
  token x_{p+m+1}, and predicts x_{p+m+2} (DeepSeek-V3's causal chain). Its verified entries end at
  n-2-m, since later ones would need draft tokens.
- Catch-up: after each step, module m computes its new verified positions (one pass per module, batched).
  Module 0's output at n-2 gives the first draft.
- Draft j <= D (D = modules in the checkpoint) comes from module j-1 at position n-2; that module's positions
  n-j..n-2 read drafts 1..j-1 as tokens, and run in the same pass as its catch-up, right after them.
  Draft j > D reuses the last module one position further on, fed its own previous output (as vLLM and
  SGLang do with one MTP layer), one pass each.
Entries written from drafts are overwritten by the next catch-up.

Meta-style parallel heads (`mtp_head_type = "meta"`) all read the main model's hidden state, so every module
catches up to n-2 from it, and draft j is module j-1's prediction there: at most D drafts, no extra passes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from tandem.engine.decode_graphs import DecodeGraphs
from tandem.engine.kv_cache import PagedKVCache
from tandem.engine.sampling import greedy_tokens, sample, target_probs
from tandem.engine.sequence import Sequence
from tandem.model.attention_metadata import Paged, PagedStep
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM


@dataclass(slots=True)
class MTPWork:
    """One sequence's share of one MTP pass: positions [start, start + len(token_ids)) of one module."""

    seq: Sequence
    start: int
    token_ids: list[int]
    hidden: torch.Tensor  # [len(token_ids), D] previous module's (or main model's) hidden at those positions


class StepCostModel:
    """Seconds per step as a linear function of the batch size, least-squares fitted on the last `window` steps.
    The sums the fit needs follow the samples as they come and go, and the fit is redone on each record, not on
    each prediction: the policy predicts every step."""

    def __init__(self, window: int = 16):
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._sums = (0, 0.0, 0, 0.0)  # of the samples' b, t, b*b and b*t (batch sizes b, seconds t)
        self._fit = (0.0, 0.0, 0.0)  # (mean batch size, mean seconds, slope)
        self.last_recorded = 0  # the policy's step clock at the newest sample
        self._renewing = False  # the next sample replaces the old ones, which serve until it comes

    def record(self, batch_size: int, seconds: float, now: int = 0) -> None:
        if self._renewing:
            self.samples.clear()
            self._sums = (0, 0.0, 0, 0.0)
            self._renewing = False
        sum_b, sum_t, sum_bb, sum_bt = self._sums
        if len(self.samples) == self.samples.maxlen:
            b, t = self.samples[0]  # leaves the window now
            sum_b, sum_t, sum_bb, sum_bt = sum_b - b, sum_t - t, sum_bb - b * b, sum_bt - b * t
        self.samples.append((batch_size, seconds))
        b, t = batch_size, seconds
        sum_b, sum_t, sum_bb, sum_bt = sum_b + b, sum_t + t, sum_bb + b * b, sum_bt + b * t
        self._sums = (sum_b, sum_t, sum_bb, sum_bt)
        self.last_recorded = now
        # batch sizes are integers: with one batch size, `spread` is exactly 0
        n = len(self.samples)
        x_mean, y_mean = sum_b / n, sum_t / n
        spread = sum_bb - sum_b * sum_b / n
        slope = (sum_bt - sum_b * y_mean) / spread if spread else 0.0
        self._fit = (x_mean, y_mean, max(slope, 0.0))

    def renew(self) -> None:
        """Measure again: the samples so far are dropped when the first new one arrives."""
        self._renewing = True

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def new_samples(self) -> int:
        """Samples since the last `renew`."""
        return 0 if self._renewing else len(self.samples)

    def predict(self, batch_size: int) -> float:
        x_mean, y_mean, slope = self._fit
        return max(y_mean + slope * (batch_size - x_mean), 1e-9) if self.samples else 0.0


class DraftCountCost:
    """What a step with k drafts costs in one batch size bucket, as two models: verifying the drafts (the main
    pass over B*(k+1) tokens, sampling and verification) and, for k > 0, producing them (the MTP catch-up and
    drafting passes, with their output heads); and how the policy has measured that count there."""

    __slots__ = ("verify", "produce", "tries", "renewed_at")

    def __init__(self, k: int):
        self.verify = StepCostModel()
        self.produce = StepCostModel() if k else None
        self.tries = 0  # times chosen to be measured since it was last renewed
        self.renewed_at = 0  # the policy's step clock when last measured again

    @property
    def samples(self) -> int:
        """Steps measured, of both models (they are measured in the same steps)."""
        return len(self.verify) if self.produce is None else min(len(self.verify), len(self.produce))

    @property
    def new_samples(self) -> int:
        v = self.verify.new_samples
        return v if self.produce is None else min(v, self.produce.new_samples)

    @property
    def last_recorded(self) -> int:
        """The step clock when both models last had a sample."""
        v = self.verify.last_recorded
        return v if self.produce is None else min(v, self.produce.last_recorded)

    def predict(self, batch_size: int) -> float:
        seconds = self.verify.predict(batch_size)
        return seconds if self.produce is None else seconds + self.produce.predict(batch_size)

    def renew(self, now: int) -> None:
        self.verify.renew()
        if self.produce is not None:
            self.produce.renew()
        self.tries = 0
        self.renewed_at = now


class SpeculationPolicy:
    """Picks the number of drafts per step that maximises measured tokens per second.

    Expected tokens per sequence with k drafts: 1 + sum_j prod_{i<=j} a_i, a_i being the measured acceptance
    of draft i given the earlier ones were accepted. The cost of k is measured, not modelled, as two wall times
    of whole decode steps: verifying k drafts (the main pass over B*(k+1) tokens, sampling and verification)
    and producing them (the MTP catch-up and drafting passes, with their output heads). Both are kept per batch
    size bucket (powers of two), as a function of the batch size within it. Each draft count is first tried a
    few times in a bucket; after that k = 0 costs nothing on the MTP side, since the engine then skips the MTP
    passes. So speculation is only chosen when it measurably pays, at this batch size, on this machine, for
    this model: at large batch a pass costs in proportion to its tokens and k falls to 0; at small batch passes
    are nearly free and k grows. Choices have hysteresis (GAIN, SWITCH_ON_GAIN), so noise in the timings does
    not flip them back and forth. Only the count being run keeps being measured; on a shared machine whose speed
    drifts, its cost and another count's measured long ago are not comparable. So a count measured more than
    FRESH_STEPS timed steps ago is measured again before the policy switches to it, and the smaller counts
    (cheaper steps) are measured again once they are that old, so that a larger count chosen on a slow spell does
    not stay on for good. A count being measured runs as it would once chosen: its steps skip the MTP passes it
    does not need (the engine resyncs the sequences afterwards).
    """

    SAMPLES_TO_TRUST = 3
    GAIN = 1.02  # how much more tokens/s a larger draft count must promise to be chosen
    # the same, for any draft at all where the last choice was none: twice the noise of step times on a shared
    # 2-core machine, since turning drafts on costs the catch-up of every sequence whose MTP passes were skipped
    SWITCH_ON_GAIN = 1.20
    MAX_TRIES = 12  # a count tried this often without being measured (say every request drafts fewer) is let be
    FRESH_STEPS = 64

    def __init__(self, max_drafts: int, adaptive: bool = True, prior_acceptance: float = 0.7, decay: float = 0.05):
        self.max_drafts = max_drafts
        self.adaptive = adaptive
        self.acceptance = [prior_acceptance] * max_drafts
        self.decay = decay
        self._costs: dict[int, list[DraftCountCost]] = {}  # bucket -> per draft count 0..max_drafts
        self.choices: dict[int, int] = {}  # bucket -> drafts last chosen there once measured (for operators)
        self._steps = 0  # timed decode steps so far: the clock of the measurements' freshness
        self._pending = [[0, 0] for _ in range(max_drafts)]  # per draft position: (reached, accepted) this step
        self._all_tried: set[int] = set()  # buckets with no count left to measure (`_untried`)
        self._last_verified: int | None = None  # drafts verified by the step before, None if it did not count
        self._last_drafted: int | None = None
        self._drafting_samples = 0  # samples recorded of steps with drafts (`_stays_off` follows them)
        self._drafting_rates: dict[int, tuple[tuple, list[float]]] = {}  # bucket -> see `_stays_off`

    @property
    def measures(self) -> bool:
        """Whether step times matter: only an adaptive policy with drafts to choose from reads them."""
        return self.adaptive and self.max_drafts > 0

    @staticmethod
    def bucket(batch_size: int) -> int:
        """Batch sizes 1, 2-3, 4-7, 8-15, ... are buckets 1, 2, 3, 4, ...; bucket b starts at 2**(b-1). (A prefill
        worker, whose sequences leave the batch after their first token, asks for none: bucket 1 too.)"""
        return max(batch_size, 1).bit_length()

    def _costs_in(self, bucket: int) -> list[DraftCountCost]:
        """What each draft count costs in a bucket, indexed by the count; made when the bucket is first met."""
        costs = self._costs.get(bucket)
        if costs is None:
            costs = self._costs[bucket] = [DraftCountCost(k) for k in range(self.max_drafts + 1)]
        return costs

    def record_verify(self, num_drafts: int | None, batch_size: int, seconds: float) -> None:
        """A decode step in which every one of `batch_size` sequences verified `num_drafts` drafts (None: a step
        that tells nothing, as one that prefills). Only a step after one that verified as many counts: the first
        after a change runs on caches the other count's passes filled (a plain step after drafting steps is
        15-30% slower at batch 8 on a CPU)."""
        steady = num_drafts is not None and num_drafts == self._last_verified
        self._last_verified = num_drafts
        if steady:
            self._steps += 1
            self._drafting_samples += num_drafts > 0
            self._costs_in(self.bucket(batch_size))[num_drafts].verify.record(batch_size, seconds, self._steps)

    def record_draft(self, num_drafts: int | None, batch_size: int, seconds: float) -> None:
        """The MTP work after a decode step that drafted `num_drafts` tokens for `batch_size` sequences (None: work
        that tells nothing); as `record_verify`, only after work that drafted as many."""
        steady = num_drafts is not None and num_drafts == self._last_drafted
        self._last_drafted = num_drafts
        if steady and num_drafts:
            self._drafting_samples += 1
            self._costs_in(self.bucket(batch_size))[num_drafts].produce.record(batch_size, seconds, self._steps)

    def _untried(self, bucket: int) -> list[int]:
        """Draft counts not yet measured (or measured again) often enough in this batch size bucket, largest
        first. None, once, stays none until a count is measured again (`DraftCountCost.renew`): samples and tries
        only grow until then; so a bucket where none is left skips the count (a decode step of one sequence asks it
        several times)."""
        if bucket in self._all_tried:
            return []
        costs = self._costs_in(bucket)
        untried = [k for k in range(self.max_drafts, -1, -1)
                   if costs[k].new_samples < self.SAMPLES_TO_TRUST and costs[k].tries < self.MAX_TRIES]
        if not untried:
            self._all_tried.add(bucket)
        return untried

    def drafts_in_use(self, batch_size: int) -> int:
        """The most drafts a sequence decoding at this batch size may be asked for: the count chosen here and any
        still to be measured (all of them before the first choice)."""
        bucket = self.bucket(batch_size)
        choice = self.choices.get(bucket)
        if not self.adaptive or choice is None:
            return self.max_drafts
        return max([choice] + self._untried(bucket))

    def exploring(self, batch_size: int) -> bool:
        """Some draft count is still to be measured at this batch size."""
        return self.measures and bool(self._untried(self.bucket(batch_size)))

    def settled_choices(self) -> tuple[tuple[int, int], ...]:
        """(smallest batch size of a bucket, drafts chosen there) for every bucket measured, smallest first."""
        return tuple((1 << (bucket - 1), k) for bucket, k in sorted(self.choices.items()))

    def observe(self, num_drafts: int, num_accepted: int) -> None:
        """One sequence's verified drafts. A step's sequences are pooled and moved into `acceptance` as one
        sample at the next `choose`, so that `decay` is per step whatever the batch size (per sequence, a batch
        of 32 would forget all but its last step or two)."""
        for j in range(min(num_drafts, num_accepted + 1)):
            self._pending[j][0] += 1
            self._pending[j][1] += j < num_accepted

    def _fold_pending(self) -> None:
        if not self._pending[0][0]:  # nothing verified since (every draft reached verifies the first)
            return
        for j, (reached, landed) in enumerate(self._pending):
            if reached:
                self.acceptance[j] += self.decay * (landed / reached - self.acceptance[j])
        self._pending = [[0, 0] for _ in range(self.max_drafts)]

    def choose(self, batch_size: int) -> int:
        """The drafts per sequence for the next step at this batch size. Called every decode step, so the
        settled cases are kept short: one pass over the counts, and where drafts are off, not even that
        (`_stays_off`)."""
        if not self.adaptive or self.max_drafts == 0:
            return self.max_drafts
        self._fold_pending()
        bucket = self.bucket(batch_size)
        untried = self._untried(bucket)
        costs = self._costs_in(bucket)
        if untried:
            costs[untried[0]].tries += 1
            return untried[0]
        # a larger count must pay clearly, or it is not worth the risk; turning speculation back on must pay
        # more, since sequences whose MTP modules were skipped first recompute what they missed
        chosen = self.choices.get(bucket)
        if chosen == 0 and self._stays_off(bucket, costs, batch_size):
            return 0
        factor = self.SWITCH_ON_GAIN if chosen == 0 else self.GAIN
        best_k, best_rate = 0, 0.0
        for k, rate in enumerate(self._rates(costs, batch_size)):
            if rate and rate > best_rate * (factor if best_k == 0 else self.GAIN):
                best_k, best_rate = k, rate
        stale = [k for k in range(best_k + 1) if self._stale(costs[k])]
        if best_k != (best_k if chosen is None else chosen) and best_k in stale:
            stale = [best_k]  # measured again before the policy switches to it
        elif best_k in stale:
            stale.remove(best_k)  # the count being run: its next steps measure it
        if stale:
            self._all_tried.discard(bucket)
            for k in stale:
                costs[k].renew(self._steps)
            return self.choose(batch_size)
        self.choices[bucket] = best_k
        return best_k

    def _rates(self, costs: list[DraftCountCost], batch_size: int, first: int = 0) -> list[float]:
        """Expected tokens per second of a sequence at each draft count from `first` on (0.0: not measured)."""
        rates, tokens, run = [], 1.0, 1.0
        for k in range(first, len(costs)):
            if k:  # tokens a step with k drafts is expected to emit: 1 + sum_j prod_{i<=j} a_i
                run *= self.acceptance[k - 1]
                tokens += run
            rates.append(tokens / costs[k].predict(batch_size) if costs[k].samples else 0.0)
        return rates

    def _stays_off(self, bucket: int, costs: list[DraftCountCost], batch_size: int) -> bool:
        """Where drafts were off, whether no count promises SWITCH_ON_GAIN times a plain step's tokens per second,
        so that `choose` keeps them off (its own answer then, found sooner). With drafts off only the plain step's
        cost keeps moving: the counts' rates with drafts are kept until a sample of them, the acceptance or the
        batch size changes."""
        key = (batch_size, self._drafting_samples, tuple(self.acceptance))
        kept = self._drafting_rates.get(bucket)
        if kept is None or kept[0] != key:
            kept = self._drafting_rates[bucket] = (key, self._rates(costs, batch_size, first=1))
        plain = costs[0]
        return bool(plain.samples) and max(kept[1]) <= 1.0 / plain.predict(batch_size) * self.SWITCH_ON_GAIN

    def _stale(self, cost: DraftCountCost) -> bool:
        """Measured, but not in the last FRESH_STEPS timed steps, nor tried again since (a count that cannot be
        measured any more, say every request now drafts fewer, is tried again once every FRESH_STEPS)."""
        return bool(cost.samples) and self._steps - max(cost.last_recorded, cost.renewed_at) > self.FRESH_STEPS


def _last_verified(seq: Sequence, module: int, empty: torch.Tensor) -> tuple[int, torch.Tensor]:
    """(position, hidden rows) of `module`'s last verified output for `seq`; an empty source where it has none
    (or the sequence does not keep that module)."""
    if module >= len(seq.mtp):
        return 0, empty
    state = seq.mtp[module]
    return (state.valid_len - 1, state.tail) if state.tail is not None else (state.valid_len, empty)


class MTPDrafter:
    """Runs the MTP modules for a batch: catch-up after the main pass, then drafting."""

    def __init__(self, model: DeepseekV3ForCausalLM, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.num_modules = len(model.mtp_layers)
        self.parallel = model.config.mtp_head_type == "meta"
        self.graphs: list[DecodeGraphs] = []  # per module drafted from, when its passes run from graphs

    @property
    def max_drafts(self) -> int | None:
        """Parallel heads cannot be chained past the last one; None = no limit."""
        return self.num_modules if self.parallel else None

    def _run(self, module: int, work: list[MTPWork]) -> list[torch.Tensor]:
        """One batched pass of MTP module `module`, from a graph where it has one; returns each sequence's output
        hidden states."""
        step = PagedStep([len(w.token_ids) for w in work], [w.start + len(w.token_ids) for w in work],
                         [w.seq.block_table for w in work], self.cache.block_size)
        ids = [t for w in work for t in w.token_ids]
        hidden = torch.cat([w.hidden for w in work])
        graphed = self.graphs[module].run(ids, step, hidden) if module < len(self.graphs) else None
        if graphed is not None:
            out = graphed[0]  # an MTP pass's graph gives no logits
        else:
            out = self.model.mtp_forward(module, torch.tensor(ids, dtype=torch.int64, device=hidden.device), hidden,
                                         Paged.from_arrays(step.arrays(), self.cache.tensor))
        return list(out.split([len(w.token_ids) for w in work]))

    def advance(self, seqs: list[Sequence], main_hidden: list[tuple[int, torch.Tensor]], num_drafts: list[int],
                num_modules: int | None = None) -> None:
        """Catch the first `num_modules` modules (default all) up on what the main pass verified (main_hidden[i] =
        (first position, hidden rows) for seqs[i]) and draft up to num_drafts[i] tokens into seq.draft_ids (and
        seq.draft_probs when sampling). Modules past `num_modules` fall behind; a sequence that needs one of them
        again finds its sources gone, goes stale and resyncs (see Sequence.resync_mtp).

        Chained modules make one pass each: module m >= 1 runs its new verified positions and, for a sequence
        drafting more than m tokens, its draft positions n-1-m..n-2 in the same pass, since draft m (from module
        m-1) is known by then. Drafts past the last module take one more pass each. A sequence whose module 0 is
        not caught up to n-2 (it went stale) drafts nothing.
        """
        num_modules = self.num_modules if num_modules is None else num_modules
        if num_modules < self.num_modules and max(num_drafts, default=0) > num_modules:
            raise ValueError(f"{max(num_drafts)} drafts need {min(max(num_drafts), self.num_modules)} MTP modules, "
                             f"not {num_modules}")
        for seq in seqs:
            seq.draft_ids, seq.draft_probs = [], None
        wants = list(num_drafts)
        probs_by_seq: dict[int, list[torch.Tensor]] = {id(s): [] for s in seqs}
        main_sources = [(start, self.model.mtp_hidden_from_main(h)) for start, h in main_hidden]
        sources = main_sources
        last_draft_out: dict[int, torch.Tensor] = {}  # the latest pass's output at a sequence's last draft position
        for m in range(num_modules):
            drafts_here = 0 if self.parallel else m  # draft positions this module runs
            work, owners, reached_n2 = [], [], {}
            # what module m+1 can read if module m gains nothing this time: module m's last verified output
            next_sources = [_last_verified(s, m, sources[0][1][:0]) for s in seqs]
            for i, seq in enumerate(seqs):
                if m >= len(seq.mtp):  # a module this sequence does not keep (it drafts fewer tokens)
                    continue
                src_start, src = sources[i]
                start, n = seq.mtp[m].valid_len, seq.num_tokens
                if start < src_start:
                    seq.mtp_stale = True  # the hidden states this module needs are gone
                    wants[i] = 0
                    continue
                end = min(src_start + len(src), n - 1 - (0 if wants[i] > m else drafts_here))
                if end <= start:
                    continue
                tokens = (seq.token_ids + seq.draft_ids)[start + drafts_here + 1:end + drafts_here + 1]
                work.append(MTPWork(seq, start, tokens, src[start - src_start:end - src_start]))
                owners.append(i)
            for i, w, out in zip(owners, work, self._run(m, work) if work else []):
                state = seqs[i].mtp[m]
                # the next module reads this one's outputs from the position before the new ones on
                next_sources[i] = (w.start - 1, torch.cat([state.tail, out])) if state.tail is not None \
                    else (w.start, out)
                verified = min(len(out), seqs[i].num_tokens - 1 - drafts_here - w.start)
                if verified > 0:
                    state.valid_len, state.tail = w.start + verified, out[verified - 1:verified]
                if w.start + len(out) == seqs[i].num_tokens - 1:
                    reached_n2[id(seqs[i])] = out[-1:]
            if not self.parallel:
                sources = next_sources
            # draft m+1: module m's output at n-2 (for module 0 and parallel heads, the verified tail there)
            active, hidden = [], []
            for i, seq in enumerate(seqs):
                if wants[i] <= m:
                    continue
                if self.parallel or m == 0:
                    at_n2 = seq.mtp[m].tail if seq.mtp[m].valid_len == seq.num_tokens - 1 else None
                else:
                    at_n2 = reached_n2.get(id(seq))
                if at_n2 is None or seq.mtp_stale:
                    wants[i] = m
                    continue
                active.append(seq)
                hidden.append(at_n2)
                last_draft_out[id(seq)] = at_n2
            if active:
                self._sample_drafts(active, hidden, m, probs_by_seq)
        if not self.parallel and num_modules == self.num_modules:
            self._draft_past_last_module(seqs, wants, last_draft_out, probs_by_seq)
        for seq, k in zip(seqs, wants):
            del seq.draft_ids[k:]
            if not seq.params.is_greedy and seq.draft_ids:
                seq.draft_probs = torch.cat(probs_by_seq[id(seq)][:k])

    def _draft_past_last_module(self, seqs: list[Sequence], wants: list[int], last_out: dict[int, torch.Tensor],
                                probs_by_seq: dict[int, list[torch.Tensor]]) -> None:
        """Drafts beyond the modules the checkpoint has reuse the last one, one position further on each time, fed
        its own previous output (as vLLM and SGLang do with one MTP layer)."""
        last = self.num_modules - 1
        for j in range(self.num_modules + 1, max(wants, default=0) + 1):
            active = [s for s, k in zip(seqs, wants) if k >= j and len(s.draft_ids) == j - 1]
            if not active:
                return
            work = [MTPWork(s, s.num_tokens - 2 + (j - self.num_modules), s.draft_ids[-1:], last_out[id(s)])
                    for s in active]
            outs = self._run(last, work)
            for seq, out in zip(active, outs):
                last_out[id(seq)] = out
            self._sample_drafts(active, outs, last, probs_by_seq)

    def _sample_drafts(self, seqs: list[Sequence], hidden: list[torch.Tensor], module: int,
                       probs_by_seq: dict[int, list[torch.Tensor]]) -> None:
        logits = self.model.mtp_logits(module, torch.cat(hidden))
        if all(s.params.is_greedy for s in seqs):  # a greedy drafter needs no probabilities
            for seq, token in zip(seqs, greedy_tokens(logits)):
                seq.draft_ids.append(token)
            return
        probs = target_probs(logits, [s.params for s in seqs])
        tokens = sample(probs, [s.generator for s in seqs])
        for i, seq in enumerate(seqs):
            seq.draft_ids.append(int(tokens[i]))
            probs_by_seq[id(seq)].append(probs[i:i + 1])
