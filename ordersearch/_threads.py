"""torch's intra-op thread count, set for a block of work.

Training is the one place where the thread count changes results: a convolution's weight
gradient is summed over the batch in per-thread parts, so the same seed gives other weights
with another thread count. Forward passes, the engine and the objectives give the same
numbers whatever the count (tested), so searches need no setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch threads (None: as they are); yields the count in force.
    Setting the count is cheap (~0.2 µs)."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield before
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
