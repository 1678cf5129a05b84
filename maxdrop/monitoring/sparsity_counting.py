"""Counting in the forward hooks of :class:`~maxdrop.callbacks.SparsityMonitor`: the per-slot sums
kept on the activations' device during an epoch (which layers are the slots: ``find_dropout_slots``,
in :mod:`maxdrop.models.slots`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["SlotSums", "channel_stats", "has_drop_counters", "has_nonfinite"]

# A float32 sum of 0/1 values is exact while the count stays below 2**24: channels with up to this
# many elements per batch are counted through a float buffer (vectorized), larger ones with
# count_nonzero (exact, slower).
EXACT_COUNT = 2**24
# Elements per block of rows counted at a time on the CPU (512 KiB of float32: fits an L2 cache).
CPU_BLOCK = 2**17


def has_drop_counters(layer: nn.Module) -> bool:
    """Whether ``layer`` counts its own drops (the maxdrop layers' ``DropStats`` protocol, maxdrop.layers.base)."""
    return all(hasattr(layer, a) for a in ("last_dropped", "last_seen", "seen_total")) and bool(
        getattr(layer, "track_stats", True)
    )


def _ncl(x: Tensor) -> tuple[int, int, int]:
    """(N, C, L): batch, channels (dim 1; 1 for a 0/1-dim input) and elements per (sample, channel)."""
    if x.ndim <= 1:
        return (x.shape[0] if x.ndim else 1), 1, 1
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


def channel_stats(
    x: Tensor, magnitude: bool, buffer: Callable[[Tensor, torch.dtype], Tensor], exact_count: int = EXACT_COUNT
) -> tuple[Tensor, Tensor | None]:
    """Per-channel nonzero count, int64 (C,), and sum of |x|, float32 (C,) or None.

    Args:
        x: a slot's input or output, (N, C, ...), (N, F), (N,) or 0-dim.
        magnitude: also return the per-channel sum of |x|.
        buffer: ``buffer(t, dtype)`` -> a reusable scratch tensor of ``t``'s shape.
        exact_count: elements per channel and batch above which ``count_nonzero`` counts instead.
    """
    n, c, length = _ncl(x)
    if n * length > exact_count:
        v = x.reshape(n, c, length)
        mag = v.abs().sum((0, 2), dtype=torch.float32) if magnitude else None
        return torch.count_nonzero(v, dim=(0, 2)), mag
    x = x.reshape(1) if x.ndim == 0 else x
    m = c * length
    # On the CPU a block of rows at a time, so that the scratch buffer stays in the L2 cache.
    rows = n if x.device.type != "cpu" else max(1, min(n, CPU_BLOCK // m))
    cnt = mag = None
    for i in range(0, n, rows):
        block = x[i : i + rows]
        k = block.shape[0]
        # out= into a reused buffer, then float sums over the batch (contiguous, vectorized):
        # sums of 0/1 stay exact while below 2**24.
        if magnitude:
            a = torch.abs(block, out=buffer(block, x.dtype)).view(k, m).sum(0, dtype=torch.float32)
            mag = a if mag is None else mag.add_(a)
        ones = torch.ne(block, 0, out=buffer(block, torch.float32)).view(k, m).sum(0)
        cnt = ones if cnt is None else cnt.add_(ones)
    return cnt.view(c, length).sum(1).long(), None if mag is None else mag.view(c, length).sum(1)


def has_nonfinite(x: Tensor, magnitude: Tensor | None) -> Tensor:
    """int64 0-dim: 1 when ``x`` holds a NaN or an infinity, else 0, without a host-device sync.

    A sum is non-finite when one of its terms is (or when it overflows float32, which only
    activations that already diverged reach): the per-channel ``|x|`` sums when they were taken,
    else one sum over ``x``, cost far less than an element-wise ``isfinite`` count.
    """
    total = magnitude.sum() if magnitude is not None else x.sum(dtype=torch.float32)
    return torch.isfinite(total).logical_not().long()


class SlotSums:
    """Running sums of one slot in one phase, on the activations' device.

    Attributes:
        cnt: int64 (2, C): nonzero elements entering (row 0) and leaving (row 1), per channel.
        mag: float32 (C,): sum of |x| entering, per channel (train with histograms only).
        folded: int64 (2,): totals moved out of ``cnt`` when the channel count changed mid-epoch.
        channels: C of ``cnt``; -1 once it changed (no per-channel figures this epoch).
        numel_in, numel_out: elements entering / leaving (Python ints, known from the shapes).
        dropped: int64 0-dim: the layer's own drop count (slots whose layer counts drops).
        seen: elements the layer counted as seen (slots whose layer counts drops).
        nonfinite: int64 0-dim: forwards whose input held a NaN or an infinity.
    """

    def __init__(self) -> None:
        self.cnt: Tensor | None = None
        self.mag: Tensor | None = None
        self.folded: Tensor | None = None
        self.channels = 0
        self.numel_in = 0
        self.numel_out = 0
        self.dropped: Tensor | None = None
        self.seen = 0
        self.nonfinite: Tensor | None = None

    def add(self, row: int, nz: Tensor, mag: Tensor | None) -> None:
        """Adds per-channel nonzero counts ``nz`` (C,) (and ``mag`` (C,)) to row 0 (in) or 1 (out)."""
        c = nz.shape[0]
        if self.channels == 0:
            self.channels = c
            self.cnt = torch.zeros(2, c, dtype=torch.int64, device=nz.device)
            self.mag = None if mag is None else torch.zeros(c, dtype=torch.float32, device=nz.device)
        if self.channels == c:
            self.cnt[row] += nz
            if mag is not None and self.mag is not None:
                self.mag += mag
            return
        if self.channels > 0:  # a new channel count: keep the totals, give up the per-channel figures
            self.folded = self.cnt.sum(1)
            self.cnt = self.mag = None
            self.channels = -1
        self.folded[row] += nz.sum()

    def add_nonfinite(self, flag: Tensor) -> None:
        self.nonfinite = flag if self.nonfinite is None else self.nonfinite + flag

    def nonzero_totals(self, device: torch.device) -> Tensor:
        """int64 (2,): nonzero elements entering and leaving, summed over channels."""
        total = torch.zeros(2, dtype=torch.int64, device=device)
        if self.cnt is not None:
            total += self.cnt.sum(1).to(device)
        if self.folded is not None:
            total += self.folded.to(device)
        return total
