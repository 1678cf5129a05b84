"""Run a burst of mid-sized CPU ops on one intra-op thread."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["one_cpu_thread"]


@contextmanager
def one_cpu_thread(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed CPU ops (a batch's gather and augmentation, a layer's selection) on one intra-op thread.

    The ops are small to mid-sized: extra threads gain little, and when the cores are shared (other
    processes, DataLoader workers) OpenMP's fork-join costs up to a scheduler quantum (~8 ms) per op,
    which made a batch 10-20x slower than on one thread. Never spans a ``yield``: the training step and
    a layer's output and backward (a few large ops) keep every thread. ``enabled=False`` (e.g. the
    tensors are on a GPU) leaves the thread count alone.
    """
    n = torch.get_num_threads()
    if not enabled or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
