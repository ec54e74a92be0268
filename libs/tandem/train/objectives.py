"""The training objectives, as pure functions of a model and a batch of token windows.

- Main stage (DeepSeek-V3 section 2.2): L = CE(main) + lambda / D * sum_k CE(MTP k), everything trained.
- MTP-D stage (self-distillation): main model and head frozen; each trained MTP module k gets
  CE(MTP k) + beta * KL(teacher || student), the teacher being the main head's distribution for the same
  target token restricted to its top-N logits, detached.
- Looped extension: the same MTP-D objective, only the newly added modules trained (the others run frozen
  to feed the causal chain).

Head types. "deepseek": module k (1-based) at position i reads h^{k-1}_i (h^0 = the main model's final-normed
hidden state, as the engine feeds it) and Emb(t_{i+k}) and predicts t_{i+k+1}. "meta" (Gloeckle et al. 2024):
independent parallel heads, head k reads the trunk's h^0_i only and predicts t_{i+k+1}; it is stored in the
same MTP layer slot with the token-embedding half of `eh_proj` held at zero, so the token input is inert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.model.attention_metadata import DenseCausal
from tandem.model.deepseek_v3 import DeepseekV3ForCausalLM
from tandem.train.config import HEAD_TYPES


def topn_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, top_n: int) -> torch.Tensor:
    """Mean over positions of KL(teacher_N || student).

    teacher_logits, student_logits: [T, V]. The teacher is renormalised over its top-N tokens; the student's
    log-probabilities are over the whole vocabulary, so mass it puts outside the teacher's top-N is penalised
    (the sum stays >= 0 because the student's probabilities over the N tokens sum to at most 1).
    """
    # T positions, V vocabulary, N kept tokens
    top = teacher_logits.detach().float().topk(min(top_n, teacher_logits.shape[-1]), dim=-1)
    log_p = top.values.log_softmax(-1)
    log_q = student_logits.float().log_softmax(-1).gather(1, top.indices)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def zero_token_input_(model: DeepseekV3ForCausalLM) -> None:
    """Meta-style heads: zero the token-embedding half of every MTP module's eh_proj (input [enorm(e); hnorm(h)])."""
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.mtp_layers:
            layer.eh_proj.weight[:, :hidden].zero_()


def compute_terms(model: DeepseekV3ForCausalLM, windows: torch.Tensor, *, head_type: str = "deepseek",
                  first_trained_module: int = 0, train_main: bool = True, kl_top_n: int = 0,
                  with_metrics: bool = False) -> dict[str, torch.Tensor]:
    """Loss terms of one batch of windows [B, L+1]: "main", "mtp{k}" and, with kl_top_n > 0, "kl{k}" (k 1-based).

    MTP modules before `first_trained_module` (0-based) run without gradient and get no terms. With
    `train_main` False the main model runs without gradient, so its logits are a stop-gradient teacher.
    `with_metrics` adds top-1 accuracies "acc_main", "acc_mtp{k}" and "agree_mtp{k}" (the module's argmax
    equals the main head's argmax for the same token: greedy acceptance under teacher forcing).
    """
    # B rows, L positions, H hidden, V vocabulary
    if head_type not in HEAD_TYPES:
        raise ValueError(f"head_type must be one of {HEAD_TYPES}, got {head_type!r}")
    B, L = windows.shape[0], windows.shape[1] - 1
    device = windows.device
    inputs, targets = windows[:, :-1], windows[:, 1:]
    grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(grad and train_main):
        hidden = model(inputs.reshape(-1), DenseCausal.for_batch(B, L, device))
        main_logits = model.logits(hidden)
        trunk = model.mtp_hidden_from_main(hidden).view(B, L, -1)
    terms = {"main": F.cross_entropy(main_logits, targets.reshape(-1))}
    if with_metrics:
        terms["acc_main"] = (main_logits.argmax(-1) == targets.reshape(-1)).float().mean()
    main_logits = main_logits.view(B, L, -1)
    prev = trunk
    for m, layer in enumerate(model.mtp_layers):
        k, n = m + 1, L - m - 1  # module k covers positions 0..L-1-k
        if n <= 0:
            break
        meta = DenseCausal.for_batch(B, n, device)
        src = (trunk if head_type == "meta" else prev)[:, :n].reshape(B * n, -1)
        with torch.set_grad_enabled(grad and m >= first_trained_module):
            if head_type == "meta":
                h = layer(torch.zeros_like(src), src, meta, model.rope_tables(meta, src.dtype))
            else:
                h = model.mtp_forward(m, inputs[:, k:].reshape(-1), src, meta)
        prev = h.view(B, n, -1)
        if m < first_trained_module:
            continue
        logits = model.mtp_logits(m, h)
        mtp_targets = windows[:, k + 1:].reshape(-1)
        terms[f"mtp{k}"] = F.cross_entropy(logits, mtp_targets)
        teacher = main_logits[:, k:].reshape(B * n, -1)  # main head at position i+k predicts t_{i+k+1} too
        if kl_top_n:
            terms[f"kl{k}"] = topn_kl(teacher.detach(), logits, kl_top_n)
        if with_metrics:
            guess = logits.argmax(-1)
            terms[f"acc_mtp{k}"] = (guess == mtp_targets).float().mean()
            terms[f"agree_mtp{k}"] = (guess == teacher.argmax(-1)).float().mean()
    return terms


def total_loss(terms: dict[str, torch.Tensor], *, stage: str, mtp_lambda: float, kl_beta: float) -> torch.Tensor:
    """Main stage: CE(main) + lambda / D * sum_k CE(MTP k). MTP-D and extension stages: the mean over the
    trained modules of CE(MTP k) + beta * KL_k (the main term is then only reported)."""
    mtp = [v for name, v in terms.items() if name.startswith("mtp")]
    kl = [v for name, v in terms.items() if name.startswith("kl")]
    if stage == "main":
        return terms["main"] + (mtp_lambda / len(mtp) * sum(mtp) if mtp else 0.0)
    if not mtp:
        raise ValueError(f"stage {stage!r} trains MTP modules, but the model has none")
    return (sum(mtp) + kl_beta * sum(kl)) / len(mtp)
