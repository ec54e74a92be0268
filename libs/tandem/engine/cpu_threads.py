"""Intra-op CPU threads for small steps.

Whether spreading the matmuls of a few rows over several threads pays depends on the CPU. On a 2-core AMD
EPYC with PyTorch 2.13, a bundled-model forward over 1 token ran 10% faster on one thread than on two, over 3
tokens 25%, over 8 tokens 19%, equal at 16 and 15% slower at 32. On a 2-core Intel Xeon, the colocated engine
decoded as fast on two threads as on one at batch 1, and 9-15% faster at batch 4 and 8. So the engine keeps
PyTorch's threads unless told otherwise (`EngineConfig.single_thread_max_tokens`). Passes of up to 3 tokens give
bitwise the same results on one thread as on several (their matmuls are not split); larger ones may differ in
the last bits, always the same way for the same token count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread_if_small(num_tokens: int, max_tokens: int, device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when it processes at most `max_tokens` tokens on the CPU."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or num_tokens > max_tokens or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
