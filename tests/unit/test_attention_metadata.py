"""The paged layout's indices, worked out by hand for a small batch."""

import torch

from tandem.model.attention_metadata import Paged

M = Paged.MASKED


def test_paged_layout_of_a_mixed_batch():
    # sequence 0: 3 positions, the last 2 new, in blocks 5 and 1; sequence 1: 2 positions, the last new, block 3
    meta = Paged.build(query_lens=[2, 1], context_lens=[3, 2], block_tables=[[5, 1], [3]], block_size=2,
                       kv_cache=torch.zeros(1, 12, 4))
    assert (meta.num_seqs, meta.max_query_len) == (2, 2)
    assert meta.positions.tolist() == [1, 2, 1]
    assert meta.key_slots.tolist() == [10, 11, 2, 6, 7, 0]  # padding points at slot 0
    assert meta.slot_mapping.tolist() == [11, 2, 7]
    assert meta.query_index.tolist() == [[0, 1], [2, 0]]  # padding points at token 0
    assert meta.query_rows.tolist() == [0, 1, 2]
    assert meta.attend_bias.shape == (2, 2, 1, 3) and meta.attend_bias.dtype == torch.float32
    assert meta.attend_bias[:, :, 0].tolist() == [[[0, 0, M], [0, 0, 0]],  # causal
                                                  [[0, 0, M], [M, M, M]]]  # past its context; a padded query


def test_uniform_query_lengths_need_no_query_grid():
    meta = Paged.build(query_lens=[1, 1], context_lens=[4, 1], block_tables=[[2, 0], [1]], block_size=2,
                       kv_cache=torch.zeros(1, 6, 4))
    assert meta.query_index is None and meta.query_rows is None
    assert meta.positions.tolist() == [3, 0]
    assert meta.slot_mapping.tolist() == [1, 2]
    assert meta.key_slots.tolist() == [4, 5, 0, 1, 2, 0, 0, 0]
    assert meta.attend_bias[:, 0, 0].tolist() == [[0, 0, 0, 0], [0, M, M, M]]


def test_a_graphed_step_derives_key_slots_and_bias_from_block_tables():
    """The padded grid a decode graph runs: sequence 0 with 2 new tokens at positions 1-2 (blocks 5 and 1),
    sequence 1 with 1 at position 1 and a padded row (block 3): each query sees its position and those before."""
    positions = torch.tensor([1, 2, 1, 0])
    meta = Paged.from_block_tables(positions, torch.tensor([11, 2, 7, 9]), torch.tensor([[5, 1], [3, 0]]),
                                   block_size=2, kv_cache=torch.zeros(1, 12, 4))
    assert (meta.num_seqs, meta.max_query_len) == (2, 2)
    assert meta.query_index is None and meta.query_rows is None
    assert meta.key_slots.tolist() == [10, 11, 2, 3, 6, 7, 0, 1]
    assert meta.attend_bias.shape == (2, 2, 1, 4) and meta.attend_bias.dtype == torch.float32
    assert meta.attend_bias[:, :, 0].tolist() == [[[0, 0, M, M], [0, 0, 0, M]],
                                                  [[0, 0, M, M], [0, M, M, M]]]  # a padded row sees key 0
