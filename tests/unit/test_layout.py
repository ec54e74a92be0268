"""CPU weights in the layout decoding reads fastest (column-major; expert banks' gate and up projections side by
side outside float32): same values and logits, where it is safe."""

import pytest
import torch

from tandem.model.attention_metadata import DenseCausal
from tandem.model.loading import load_model
from tandem.model.layout import experts_side_by_side
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


def is_side_by_side(t: torch.Tensor) -> bool:
    return t.permute(2, 0, 1).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_banks_built_from_weights_are_column_major_on_cpu_gate_and_up_side_by_side_outside_float32(dtype):
    weights = {"gate_proj": torch.randn(3, 8, 16, dtype=dtype), "up_proj": torch.randn(3, 8, 16, dtype=dtype),
               "down_proj": torch.randn(3, 16, 8, dtype=dtype)}
    bank = ExpertBank.from_weights(weights)
    for name, w in weights.items():
        assert torch.equal(getattr(bank, name), w)
    assert is_column_major(bank.down_proj)
    side_by_side = dtype != torch.float32
    assert is_side_by_side(bank.gate_up_proj) == side_by_side and is_column_major(bank.gate_up_proj) != side_by_side
    assert bank._side_by_side == side_by_side


def test_experts_side_by_side_make_one_matrix_of_every_experts_columns():
    w = torch.randn(3, 8, 16)
    flat = experts_side_by_side(w).permute(2, 0, 1).reshape(16, 24)
    assert flat.is_contiguous()
    for e in range(3):
        assert torch.equal(flat[:, 8 * e:8 * (e + 1)], w[e].t())


def test_a_bfloat16_model_loads_its_expert_banks_gate_and_up_side_by_side(hf_checkpoint):
    path = hf_checkpoint(q_lora_rank=24, n_group=4, topk_group=2, first_k_dense_replace=1, yarn=False,
                         num_mtp_layers=1, seed=7).path
    model = load_model(path, dtype=torch.bfloat16)
    row_major = dict(load_model(path, dtype=torch.bfloat16, column_major=False).named_parameters())
    banks = [(name, p) for name, p in model.named_parameters() if name.endswith("bank.gate_up_proj")]
    assert banks and all(is_side_by_side(p) and torch.equal(p, row_major[name]) for name, p in banks)
