"""GenerateRequest -> (prompt ids, SamplingParams, speculative tokens), checking every field first.

Each check raises `RequestError(field, message)`, the message naming the field, which the servicer answers
with INVALID_ARGUMENT. Stop strings are matched by the gateway on decoded text (see `stream`), so they are not
part of the engine's SamplingParams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tandem.engine.sampling import SamplingError, SamplingParams
from tandem.engine.token_healing import TokenHealer
from tandem.v1 import gateway_pb2 as pb


class RequestError(ValueError):
    """A request field Tandem cannot serve; `field` is its name in GenerateRequest."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    stop: tuple[str, ...]
    num_speculative_tokens: int | None  # None: the server's default


def parse_generate_request(request: pb.GenerateRequest, tokenizer, model_info: pb.ModelInfo,
                           healer: TokenHealer | None = None) -> EngineRequest:
    """Validate `request` against the served model; `tokenizer` may be None (token-id prompts only). A text
    prompt is healed by `healer` unless the request disables it (see tandem.engine.token_healing)."""
    prompt_field, prompt_ids = _prompt(request, tokenizer, model_info.vocab_size)
    healed = None
    if prompt_field == "prompt" and healer is not None and not request.disable_token_healing:
        healed = healer.heal(prompt_ids)
        prompt_ids = healed.prompt_ids
    context = model_info.max_context_tokens
    if len(prompt_ids) >= context:
        raise RequestError(prompt_field, f"{prompt_field}: {len(prompt_ids)} tokens leave no room to generate in "
                                         f"the model's context of {context} tokens")
    if request.max_tokens <= 0:
        raise RequestError("max_tokens", f"max_tokens must be > 0, got {request.max_tokens}")
    if len(prompt_ids) + request.max_tokens > context:
        raise RequestError("max_tokens", f"max_tokens {request.max_tokens} is beyond the limit: the prompt's "
                                         f"{len(prompt_ids)} tokens leave room for {context - len(prompt_ids)} in "
                                         f"the model's context of {context} tokens")
    if not math.isfinite(request.temperature) or request.temperature < 0:
        raise RequestError("temperature", f"temperature must be a finite number >= 0, got {request.temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise RequestError("top_p", f"top_p must be in (0, 1] (unset means 1), got {top_p}")
    if request.top_k < 0:
        raise RequestError("top_k", f"top_k must be >= 0 (0 = off), got {request.top_k}")
    stop = tuple(request.stop)
    if any(not s for s in stop):
        raise RequestError("stop", "stop strings must not be empty")
    if stop and tokenizer is None:
        raise RequestError("stop", "stop strings need the model's tokenizer, and this model has none")
    if request.speculative_tokens < -1:
        raise RequestError("speculative_tokens", "speculative_tokens must be -1 (none), 0 (the server's default) "
                                                 f"or a positive count, got {request.speculative_tokens}")
    try:
        params = SamplingParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=top_p,
                                top_k=request.top_k, seed=request.seed if request.HasField("seed") else None)
    except SamplingError as e:  # the checks above cover every field; this keeps the two in step
        raise RequestError(str(e).split(" ", 1)[0], str(e)) from None
    if healed is not None:
        params = healed.apply(params)
    return EngineRequest(prompt_ids, params, stop, _speculative_tokens(request.speculative_tokens))


def _prompt(request: pb.GenerateRequest, tokenizer, vocab_size: int) -> tuple[str, list[int]]:
    """(the field the prompt came in, its token ids)."""
    has_text, has_ids = bool(request.prompt), bool(request.prompt_token_ids)
    if has_text and has_ids:
        raise RequestError("prompt", "set exactly one of prompt and prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise RequestError("prompt", "prompt is empty: set exactly one of prompt (non-empty text) and "
                                     "prompt_token_ids")
    if has_ids:
        ids = list(request.prompt_token_ids)
        for i, t in enumerate(ids):
            if not 0 <= t < vocab_size:
                raise RequestError("prompt_token_ids", f"prompt_token_ids[{i}] = {t} is not a token id of the "
                                                       f"model's vocabulary [0, {vocab_size})")
        return "prompt_token_ids", ids
    if tokenizer is None:
        raise RequestError("prompt", "this model has no tokenizer: send prompt_token_ids instead of prompt")
    ids = tokenizer.encode(request.prompt).ids
    if not ids:
        raise RequestError("prompt", "prompt is empty after tokenization")
    return "prompt", ids


def _speculative_tokens(value: int) -> int | None:
    """The proto's 0 / -1 / n onto the engine's None (server default) / 0 / n; the engine caps n at its own
    maximum, so asking for more than ModelInfo.num_mtp_layers gets that many, never an error."""
    if value == 0:
        return None
    return 0 if value == -1 else value
