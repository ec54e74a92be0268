"""Small CPU steps run on one intra-op thread, and the thread count comes back afterwards."""

import pytest
import torch

from tandem.engine.cpu_threads import single_thread_if_small
from tandem.engine.engine import EngineConfig

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_small_step_runs_on_one_thread_and_a_large_one_on_all(two_threads):
    with single_thread_if_small(16, 16, CPU):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with single_thread_if_small(17, 16, CPU):
        assert torch.get_num_threads() == 2
    with single_thread_if_small(1, 0, CPU):  # 0 turns it off
        assert torch.get_num_threads() == 2


def test_the_thread_count_comes_back_after_an_error(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with single_thread_if_small(1, 16, CPU):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_a_negative_limit_is_refused():
    with pytest.raises(ValueError, match="single_thread_max_tokens must be >= 0"):
        EngineConfig(single_thread_max_tokens=-1)
