"""What a prefill worker hands a decode worker, so that decoding continues exactly where prefill stopped."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class PrefilledSequence:
    request_id: str
    prompt_ids: list[int]
    first_token: int
    kv: torch.Tensor  # [num_kv_layers, len(prompt_ids), kv_dim]: main and MTP layers' latent + rope key
    mtp_valid_lens: list[int]  # verified positions of each MTP module's cache
    mtp_tails: torch.Tensor | None  # [num_mtp_modules, hidden]: each module's output at its last verified position
    rng_state: torch.Tensor | None  # the request's sampling generator, so seeded sampling continues its stream
