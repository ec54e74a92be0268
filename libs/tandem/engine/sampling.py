"""Sampling parameters, next-token sampling and verification of speculative drafts.

Each request owns its own generator, so a seeded request replays the same tokens whatever else
shares its batch. Every random choice is a uniform draw on that generator, turned into a token by
inverting the CDF on the probabilities' own device: CPU generators can then drive CUDA tensors,
which `torch.multinomial(..., generator=cpu_generator)` refuses to do.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from torch import Tensor


class SamplingError(ValueError):
    """Bad generation parameter; the message names the field."""


@dataclass(slots=True)
class SamplingParams:
    """How one request generates: its length, its randomness and when it stops."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # matched by the engine on decoded text
    ignore_eos: bool = False
    # token healing (tandem.engine.token_healing): the first generated token is one of these (empty = any),
    # and the generated text leaves out this prefix, which the prompt already shows
    allowed_first_tokens: tuple[int, ...] = ()
    skip_text_prefix: str = ""

    def __post_init__(self) -> None:
        self.max_tokens = _int("max_tokens", self.max_tokens)
        _check(self.max_tokens > 0, f"max_tokens must be > 0, got {self.max_tokens}")
        self.temperature = _finite("temperature", self.temperature)
        _check(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        self.top_p = _finite("top_p", self.top_p)
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        self.top_k = _int("top_k", self.top_k)
        _check(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed)
            _check(0 <= self.seed < 2**64, f"seed must be in [0, 2**64), got {self.seed}")
        ids_ok = isinstance(self.stop_token_ids, (list, tuple))
        _check(ids_ok, f"stop_token_ids must be a list, got {self.stop_token_ids!r}")
        self.stop_token_ids = tuple(_int("stop_token_ids", t) for t in self.stop_token_ids)
        _check(all(t >= 0 for t in self.stop_token_ids), f"stop_token_ids must be >= 0, got {self.stop_token_ids}")
        _check(isinstance(self.stop, (str, list, tuple)), f"stop must be a string or a list, got {self.stop!r}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must hold non-empty strings, got {self.stop!r}")
        _check(isinstance(self.ignore_eos, bool), f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        ids_ok = isinstance(self.allowed_first_tokens, (list, tuple))
        _check(ids_ok, f"allowed_first_tokens must be a list, got {self.allowed_first_tokens!r}")
        self.allowed_first_tokens = tuple(_int("allowed_first_tokens", t) for t in self.allowed_first_tokens)
        _check(all(t >= 0 for t in self.allowed_first_tokens),
               f"allowed_first_tokens must be >= 0, got {self.allowed_first_tokens}")
        _check(isinstance(self.skip_text_prefix, str), f"skip_text_prefix must be a string, got "
                                                       f"{self.skip_text_prefix!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingError(message)


def _int(name: str, value: object) -> int:
    _check(isinstance(value, Integral) and not isinstance(value, bool), f"{name} must be an int, got {value!r}")
    return int(value)


def _finite(name: str, value: object) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    _check(ok, f"{name} must be a finite number, got {value!r}")
    return float(value)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`; without one, seeded from the OS so each request has its own stream."""
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    return torch.Generator().manual_seed(seed)


def greedy_tokens(logits: Tensor) -> list[int]:
    """Each row's argmax (the lowest index on ties), as a list. On the CPU numpy's vectorised argmax does it:
    torch's reduction took 195 us over [32, 4096] float32 logits on a 2-core Xeon, numpy's 20 us."""
    if logits.device.type == "cpu":
        return logits.detach().float().numpy().argmax(-1).tolist()  # numpy has no bfloat16
    return logits.argmax(-1).tolist()


def target_probs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Probabilities [N, V] float32 to sample row i from, under params[i].

    Greedy rows are one-hot at the argmax (lowest index on ties); the others are softmax(logits / T)
    restricted to the top-k tokens, then to the smallest top set whose mass reaches top_p.
    """
    # N rows, V vocab
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(f"target_probs wants logits [N, V] and N params, got {tuple(logits.shape)} and {len(params)}")
    v, device = logits.shape[1], logits.device
    logits = logits.float()
    temperature = torch.tensor([p.temperature for p in params], device=device)
    greedy = (temperature == 0)[:, None]
    # Shifting by the max first keeps a tiny temperature from overflowing to inf (and softmax to nan).
    scaled = (logits - logits.amax(-1, keepdim=True)) / torch.where(greedy, 1.0, temperature[:, None])
    if any(not p.is_greedy and (0 < p.top_k < v or p.top_p < 1) for p in params):
        top_k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in params], device=device)
        top_p = torch.tensor([p.top_p for p in params], device=device)
        scaled = _top_k_top_p(scaled, top_k, top_p)
    one_hot = torch.zeros_like(scaled).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, scaled.softmax(-1))


def _top_k_top_p(scaled: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """`scaled` with -inf outside each row's top-k, then outside its top-p nucleus."""
    # N rows, V vocab
    ranked, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(ranked.shape[-1], device=ranked.device)
    ranked = ranked.masked_fill(rank >= top_k[:, None], -math.inf)
    probs = ranked.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # 0 at rank 0, so the top token always stays
    # Rows with top_p = 1 are left alone: rounding in the cumsum could otherwise cut their tail.
    ranked = ranked.masked_fill((mass_before >= top_p[:, None]) & (top_p[:, None] < 1), -math.inf)
    return torch.full_like(scaled, -math.inf).scatter_(-1, order, ranked)


def sample(probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
    """Token ids [N] int64, row i drawn from probs[i] with generators[i] (None = torch's global one)."""
    # N rows, V vocab
    if probs.dim() != 2 or probs.shape[0] != len(generators):
        raise ValueError(f"sample wants probs [N, V] and N generators, got {tuple(probs.shape)} and {len(generators)}")
    return _invert_cdf(probs, _uniforms(generators, 1, probs.device)[:, 0])


def _uniforms(generators: Sequence[torch.Generator | None], n: int, device: torch.device) -> Tensor:
    """Uniforms [len(generators), n] in [0, 1) on `device`; row i comes from generators[i]."""
    rows = [torch.rand(n, generator=g, device=None if g is None else g.device) for g in generators]
    return torch.stack(rows).to(device) if rows else torch.empty(0, n, device=device)


def _invert_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Index [N] drawn from each row of unnormalised `weights` [N, V], given uniforms `u` [N]."""
    cdf = weights.float().cumsum(-1)
    # (1 - u) lies in (0, 1], so the first index whose cdf reaches it always has weight > 0:
    # a one-hot row yields its index whatever u is.
    ids = torch.searchsorted(cdf, ((1 - u) * cdf[:, -1])[:, None]).squeeze(-1)
    return ids.clamp_max(weights.shape[-1] - 1)  # only a nan row could point past the end


def verify_drafts(
    target: Tensor, draft_probs: Tensor | None, draft_ids: Tensor, generators: Sequence[torch.Generator | None]
) -> tuple[Tensor, Tensor]:
    """Rejection-sample K drafted tokens per row against the target (Leviathan et al. 2023, Chen et al. 2023).

    target [B, K+1, V] are target probabilities at the K draft positions and the bonus position;
    draft_probs [B, K, V] the drafter's (None: a deterministic drafter, one-hot at draft_ids);
    draft_ids [B, K]. Draft j is accepted with probability min(1, p(d_j) / q(d_j)); the first
    rejection emits a token from norm(max(0, p - q)) and stops, and if all K pass a bonus token is
    drawn from target[:, K]. The emitted tokens are then distributed exactly as the target's own.
    Returns (num_accepted [B] int64, tokens [B, K+1] int64): tokens[b, :num_accepted[b] + 1]
    are emitted, the rest are -1.
    """
    # B rows, K drafts, V vocab
    b, k, v = draft_ids.shape[0], draft_ids.shape[-1], target.shape[-1]
    shapes_ok = target.dim() == 3 and draft_ids.dim() == 2 and target.shape[:2] == (b, k + 1)
    if not shapes_ok or len(generators) != b or (draft_probs is not None and draft_probs.shape != (b, k, v)):
        raise ValueError(
            "verify_drafts wants target [B, K+1, V], draft_probs [B, K, V] or None, draft_ids [B, K], B generators; "
            f"got {tuple(target.shape)}, {None if draft_probs is None else tuple(draft_probs.shape)}, "
            f"{tuple(draft_ids.shape)} and {len(generators)}"
        )
    u = _uniforms(generators, k + 1, target.device)  # K acceptance draws, then one for the emitted token
    p_draft = target[:, :k].gather(-1, draft_ids[..., None]).squeeze(-1).float()
    q_draft = torch.ones_like(p_draft)
    if draft_probs is not None:
        q_draft = draft_probs.gather(-1, draft_ids[..., None]).squeeze(-1).float()
    # u < p / q without the division: p = 0 always rejects, and a one-hot target (p = 1) always
    # accepts its argmax, whatever u is, so greedy rows come out exact.
    accepted = u[:, :k] * q_draft.clamp(max=1) < p_draft
    num_accepted = accepted.long().cumprod(-1).sum(-1)
    rows = torch.arange(b, device=target.device)
    p = target[rows, num_accepted].float()
    residual = p
    if k:
        at = num_accepted.clamp(max=k - 1)
        if draft_probs is None:
            q = torch.zeros_like(p).scatter_(-1, draft_ids[rows, at][:, None], 1.0)
        else:
            q = draft_probs[rows, at].float()
        residual = torch.where((num_accepted < k)[:, None], (p - q).clamp_min(0), p)
        # p == q up to rounding leaves nothing; p itself is then the right law.
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    tokens = torch.full((b, k + 1), -1, dtype=torch.long, device=target.device)
    tokens[:, :k] = torch.where(torch.arange(k, device=target.device) < num_accepted[:, None], draft_ids, -1)
    tokens.scatter_(1, num_accepted[:, None], _invert_cdf(residual, u[:, k])[:, None])
    return num_accepted, tokens
