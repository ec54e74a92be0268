"""The CPU kernel of a prompt's causal attention over its own expanded keys and values.

A prompt chunk with nothing cached before it attends over keys and values expanded from its own latents
(`MLAttention._attend_prompts`), in `scaled_dot_product_attention`. On the CPU its bfloat16 kernel ran 128-token
prompts of the bundled model's 8 heads of 48 dims at about 15 GMAC/s on a 2-core EPYC (Zen 4): 11 ms a layer for a
batch of 32, a third of the prefill. This kernel (`prompt_attention.cpp`) runs each (sequence, head) as small
matmuls in the register tiles the feed-forward kernels use (`tiles.h`: `vdpbf16ps` in bfloat16 where the CPU has
AVX512-BF16), 8 query rows at a time over the keys up to the last of them, with the softmax in float32 and the
probabilities rounded to the inputs' dtype, as the GPU's fused kernels round them.

It serves eager prompt chunks of inference on the CPU, where the CPU kernels' library is loaded (`applies`).
"""

from __future__ import annotations

import torch

from tandem.kernels import library

VALUE_MULTIPLE = 32  # the kernel's value tiles are 32 wide

library.OPS.define("prompt_attention(Tensor q_nope, Tensor q_pe, Tensor k_nope, Tensor k_pe, Tensor v, int[] lengths, "
                   "float scale) -> Tensor")


def applies(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
            v: torch.Tensor) -> bool:
    """Whether the kernel serves attention of these queries, keys and values (`prompt_attention`'s): loaded, on the
    CPU, not being traced by a compiler, no gradient wanted, the key dim N + R even and V a multiple of 32."""
    return library.runs_on(q_nope, q_pe, k_nope, k_pe, v) and not torch.compiler.is_compiling() \
        and (q_nope.shape[-1] + q_pe.shape[-1]) % 2 == 0 and v.shape[-1] % VALUE_MULTIPLE == 0


def prompt_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                     v: torch.Tensor, lengths: list[int], scale: float) -> torch.Tensor:
    """[T, H, V]: each sequence of `lengths` (one after another along T) attending causally to itself, with softmax
    `scale`. Queries and keys come as MLA makes them, in two parts that the kernel joins per (sequence, head) where
    concatenating whole tensors cost a pass over memory each (and the rope key, shared by every head, was
    broadcast): q_nope [T, H, N] and q_pe [T, H, R], k_nope [T, H, N] and k_pe [T, R]; v [T, H, V]; one dtype."""
    return torch.ops.tandem.prompt_attention(q_nope, q_pe, k_nope, k_pe, v, lengths, scale)
