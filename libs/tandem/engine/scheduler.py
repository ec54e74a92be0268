"""Continuous batching: which sequences run this step, and how many of their tokens.

Running sequences decode first (one token plus their drafts each); the rest of the step's token budget
goes to prefill chunks, so a long prompt is split over several steps instead of stalling every decode.
When the KV pool runs dry the newest running sequence is preempted: its blocks are freed and it is
recomputed from its known tokens later.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from tandem.engine.kv_cache import PagedKVCache
from tandem.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int  # known tokens fed this step, token_ids[num_cached : num_cached + num_new]
    draft_ids: list[int]  # drafts fed after them (only when the known tokens run out)

    @property
    def num_fed(self) -> int:
        return self.num_new + len(self.draft_ids)

    @property
    def samples(self) -> bool:
        """This step feeds the last known token, so its logits give new tokens."""
        return self.seq.num_cached + self.num_new == self.seq.num_tokens


class Scheduler:
    def __init__(self, cache: PagedKVCache, max_num_seqs: int, max_num_batched_tokens: int):
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence, front: bool = False) -> None:
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> list[ScheduledSeq]:
        batch: list[ScheduledSeq] = []
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            uncached = seq.num_uncached
            chunk = min(uncached, budget) if uncached > 1 else 1
            if chunk == 0:
                continue
            drafts = seq.draft_ids if chunk == uncached else []  # drafts follow the last known token
            if not self._reserve(seq, seq.num_cached + chunk + len(drafts)):
                continue  # seq itself was preempted
            batch.append(ScheduledSeq(seq, chunk, list(drafts)))
            budget -= chunk if uncached > 1 else 0
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            chunk = min(seq.num_uncached, budget)
            drafts = seq.draft_ids if seq.num_cached + chunk == seq.num_tokens else []  # a handed-over sequence
            if not self.cache.ensure_capacity(seq.block_table, seq.num_cached + chunk + len(drafts)):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, chunk, list(drafts)))
            budget -= chunk
        return batch

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's blocks, preempting sequences newer than it (not yet scheduled this step) while the pool
        is short; with none left, seq itself waits."""
        while not self.cache.ensure_capacity(seq.block_table, num_tokens):
            newer = self.running[self.running.index(seq) + 1:]
            if not newer:
                if len(self.running) == 1:
                    raise RuntimeError(f"request {seq.request_id} needs {num_tokens} tokens of KV cache, more than "
                                       "the whole pool holds")
                self.preempt(seq)
                return False
            self.preempt(newer[-1])
        return True

    def preempt(self, seq: Sequence) -> None:
        log.info("preempting request %s (%d tokens) to free KV blocks", seq.request_id, seq.num_tokens)
        self.cache.release(seq.block_table)
        seq.reset_cache_state()
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.cache.release(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
