"""Column-major CPU weights: same values and logits, the layout decoding reads fastest, where it is safe."""

import torch

from tandem.model.attention_metadata import DenseCausal
from tandem.model.loading import load_model
from tandem.moe.experts import ExpertBank


def is_column_major(t: torch.Tensor) -> bool:
    return t.mT.is_contiguous()


def test_load_model_stores_matrices_column_major_except_embedding_and_kv_b_proj(hf_checkpoint):
    path = hf_checkpoint(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, yarn=False,
                         num_mtp_layers=1, seed=7).path
    model = load_model(path)
    row_major = load_model(path, column_major=False)
    params = dict(model.named_parameters())
    for name, p in row_major.named_parameters():
        assert torch.equal(params[name], p), name
        assert p.dim() < 2 or p.is_contiguous(), name
        if p.dim() < 2:
            continue
        keeps_rows = name.endswith("embed_tokens.weight") or "kv_b_proj" in name
        assert (params[name].is_contiguous() if keeps_rows else is_column_major(params[name])), name
    assert any("experts.bank" in name and is_column_major(p) for name, p in params.items())
    ids = torch.tensor([5, 9, 13, 2, 7, 11])
    with torch.no_grad():
        meta = DenseCausal.for_batch(1, len(ids))
        torch.testing.assert_close(model.logits(model(ids, meta)), row_major.logits(row_major(ids, meta)),
                                   rtol=1e-5, atol=1e-5)


def test_expert_banks_built_from_weights_are_column_major_on_cpu():
    weights = {"gate_proj": torch.randn(3, 8, 16), "up_proj": torch.randn(3, 8, 16), "down_proj": torch.randn(3, 16, 8)}
    bank = ExpertBank.from_weights(weights)
    for name, w in weights.items():
        assert torch.equal(getattr(bank, name), w) and is_column_major(getattr(bank, name))
