"""A request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from tandem.engine.sampling import SamplingParams, make_generator


class Status(enum.Enum):
    WAITING = "waiting"  # needs (re)prefill before it can decode
    RUNNING = "running"
    PREFILLED = "prefilled"  # a prefill-only request holding its KV until a decode worker takes it
    FINISHED = "finished"


@dataclass(slots=True)
class SpecStats:
    """Speculative-decoding counters of one request."""

    steps: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    proposed_by_position: list[int] = field(default_factory=list)
    accepted_by_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.steps += 1
        self.draft_tokens += num_drafts
        self.accepted_tokens += num_accepted
        for j in range(num_drafts):
            if j >= len(self.proposed_by_position):
                self.proposed_by_position.append(0)
                self.accepted_by_position.append(0)
            self.proposed_by_position[j] += 1
            self.accepted_by_position[j] += int(j < num_accepted)

    def merge(self, other: "SpecStats") -> None:
        self.steps += other.steps
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        for j, (p, a) in enumerate(zip(other.proposed_by_position, other.accepted_by_position)):
            if j >= len(self.proposed_by_position):
                self.proposed_by_position.append(0)
                self.accepted_by_position.append(0)
            self.proposed_by_position[j] += p
            self.accepted_by_position[j] += a

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            # tokens emitted per verification step: accepted drafts plus the one the main model adds
            "mean_accepted_length": (self.accepted_tokens + self.steps) / self.steps if self.steps else 0.0,
            "acceptance_by_position": [a / p for a, p in zip(self.accepted_by_position, self.proposed_by_position)],
        }


@dataclass(slots=True)
class MTPState:
    """Per MTP module: positions [0, valid_len) of its KV cache hold verified entries, and `tail` is its output
    hidden state at position valid_len - 1, which the next module needs to catch up."""

    valid_len: int = 0
    tail: torch.Tensor | None = None


class Sequence:
    """Tokens known so far (`token_ids` = prompt + output), how many the main KV cache holds, MTP state and drafts.

    The main cache holds positions [0, num_cached). A step feeds token_ids[num_cached:...]; once a step has fed
    every known token, the model's last logits give the next one.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_drafts: int,
                 num_mtp_modules: int):
        self.request_id = request_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.generator = make_generator(params.seed) if not params.is_greedy else None
        self.max_drafts = max_drafts
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.block_table: list[int] = []
        self.num_cached = 0
        self.mtp = [MTPState() for _ in range(num_mtp_modules)]
        self.mtp_stale = False  # MTP skipped a step: it can no longer draft for this sequence
        self.draft_ids: list[int] = []
        self.draft_probs: torch.Tensor | None = None  # [k, V] drafter's probs when sampling, None when greedy
        self.spec = SpecStats()
        self.prefill_only = False
        # until its prefill starts: the engine then cuts `mtp` to the modules its policy drafts from
        self.settles_mtp_modules = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - self.num_cached

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def can_draft(self) -> bool:
        return bool(self.mtp) and self.max_drafts > 0 and not self.mtp_stale

    @property
    def pins_drafts(self) -> bool:
        """Seeded sampling replays exactly only if every step drafts as many tokens as the last run did, since
        drafting and verification draw from the request's generator: such requests ignore the adaptive policy."""
        return self.params.seed is not None and not self.params.is_greedy

    @property
    def mtp_lag(self) -> int:
        """Positions the main model must recompute before a stale sequence can draft again."""
        return self.num_cached - min((m.valid_len for m in self.mtp), default=self.num_cached)

    def keep_mtp_modules(self, num_modules: int) -> None:
        """Keep only the first `num_modules` MTP modules for this sequence: the others are never run for it, so it
        drafts at most that many tokens (none with 0). A prefill worker catches only the modules its decode worker
        will draft from up on the prompt. Keeping them all changes nothing: drafts past the last module reuse it."""
        if num_modules < len(self.mtp):
            del self.mtp[num_modules:]
            self.max_drafts = min(self.max_drafts, num_modules)

    def resync_mtp(self) -> None:
        """Let a stale sequence draft again: roll the main cache back to where every MTP module is still valid, so
        the next step re-feeds those tokens (their KV entries are rewritten unchanged) and its hidden states
        catch the modules up."""
        valid = min(m.valid_len for m in self.mtp)
        self.mtp = [MTPState(valid_len=valid) for _ in self.mtp]
        self.num_cached = min(self.num_cached, valid)
        self.mtp_stale = False

    def reset_cache_state(self) -> None:
        """After preemption: everything will be recomputed from the known tokens."""
        self.num_cached = 0
        self.mtp = [MTPState() for _ in self.mtp]
        self.mtp_stale = False
        self.draft_ids = []
        self.draft_probs = None
