"""The CPU routing kernel (`tandem.kernels.routing`) against DeepSeekMoE's routing as tensor operations
(`tandem.moe.routing.route`)."""

import pytest
import torch

from tandem.kernels import library
from tandem.kernels import routing as routing_kernel
from tandem.moe.routing import route


@pytest.fixture(autouse=True)
def build_dir(cpu_kernels):
    return cpu_kernels


def as_tensor_operations(monkeypatch, logits, bias, **kw):
    with monkeypatch.context() as m:
        m.setattr(library, "_loaded", False)
        assert not routing_kernel.applies(logits, bias)
        return route(logits, bias, **kw)


# (experts, top_k, n_group, topk_group, norm_topk_prob): the bundled model's, DeepSeek-V3's, Moonlight's (one group,
# weights not normalised), groups of two, and experts that are not a whole number of 16-lane vectors
SHAPES = [(16, 4, 4, 2, True), (256, 8, 8, 4, True), (64, 6, 1, 1, False), (8, 2, 4, 3, True), (40, 5, 5, 3, True)]


@pytest.mark.parametrize("experts, top_k, n_group, topk_group, norm", SHAPES)
def test_the_kernel_picks_the_experts_and_weights_of_the_tensor_operations(monkeypatch, experts, top_k, n_group,
                                                                           topk_group, norm):
    g = torch.Generator().manual_seed(experts)
    logits, bias = torch.randn(257, experts, generator=g) * 2, torch.randn(experts, generator=g) * 0.5
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=2.5)
    assert routing_kernel.applies(logits, bias)
    weights, ids = route(logits, bias, **kw)
    want_weights, want_ids = as_tensor_operations(monkeypatch, logits, bias, **kw)
    # the same experts; the tensor operations' order is unspecified (`topk(sorted=False)`), the kernel's best first
    ids_sorted, order = ids.sort(-1)
    want_sorted, want_order = want_ids.sort(-1)
    assert torch.equal(ids_sorted, want_sorted)
    # (the kernel's sigmoid is a polynomial exponential's: within a few units in the sixth place)
    torch.testing.assert_close(weights.gather(1, order), want_weights.gather(1, want_order), rtol=1e-5, atol=1e-5)
    choice = logits.sigmoid() + bias
    assert (choice.gather(1, ids).diff(dim=-1) <= 0).all()  # best first


def test_ties_go_to_the_lower_index_and_groups_by_their_best_two():
    # every expert alike: groups 0 and 1 win, and in them the first experts
    kw = dict(top_k=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.0)
    weights, ids = route(torch.zeros(2, 16), torch.zeros(16), **kw)
    assert ids.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    torch.testing.assert_close(weights, torch.full((2, 4), 0.25))
    # group 3 holds the single best expert but nothing else; groups 2 and 0 (tied with 1) have the best two pairs
    logits = torch.zeros(1, 16)
    logits[0, 12], logits[0, 13:], logits[0, 8:10] = 5.0, -10.0, 3.0
    _, ids = route(logits, torch.zeros(16), **kw)
    assert ids.tolist() == [[8, 9, 0, 1]]


def test_bad_inputs_get_clear_errors():
    kw = dict(top_k=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.0)
    with pytest.raises(RuntimeError, match=r"bias must be \[16\] float32"):
        routing_kernel.route(torch.zeros(2, 16), torch.zeros(8), **kw)
    with pytest.raises(RuntimeError, match="logits must be CPU"):
        routing_kernel.route(torch.zeros(2, 16, dtype=torch.bfloat16), torch.zeros(16), **kw)
    with pytest.raises(RuntimeError, match="do not split into 3 groups"):
        routing_kernel.route(torch.zeros(2, 16), torch.zeros(16), **{**kw, "n_group": 3})
    with pytest.raises(RuntimeError, match="cannot pick 9 experts from 2 groups of 4"):
        routing_kernel.route(torch.zeros(2, 16), torch.zeros(16), **{**kw, "top_k": 9})
    with pytest.raises(RuntimeError, match=r"topk_group must be in \[1, 4\]"):
        routing_kernel.route(torch.zeros(2, 16), torch.zeros(16), **{**kw, "topk_group": 5})


def test_training_keeps_the_tensor_operations_whose_weights_carry_gradients():
    logits = torch.randn(3, 16, requires_grad=True)
    assert not routing_kernel.applies(logits, torch.zeros(16))
    weights, _ = route(logits, torch.zeros(16), top_k=4, n_group=4, topk_group=2, norm_topk_prob=True,
                       routed_scaling_factor=1.0)
    weights.sum().backward()
    assert logits.grad is not None
