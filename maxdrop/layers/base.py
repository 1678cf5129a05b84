"""What every maxdrop layer shares: the eval / zero-fraction short-circuit, the drop counters and
the argument checks. A layer supplies only its mask (timm's pure function + thin module, one level up).

A subclass of :class:`MaskDropLayer` sets :attr:`~MaskDropLayer.fraction_name` (``"p"``, ``"rate"``,
``"h_ratio"``) and implements :meth:`~MaskDropLayer.drop_mask`; the base's ``forward`` returns the
input untouched in eval (unless ``active_in_eval``) or when the fraction is 0, records the drop
counts in training, and zeroes the masked elements (:meth:`~MaskDropLayer.apply_mask`).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

__all__ = ["SCOPES", "DropStats", "MaskDropLayer", "check_fraction", "check_scope", "zero_where"]

#: Over which elements a layer's statistics (min and max, top k) are taken.
#: ``tensor``: the whole tensor (the authors' code; depends on the rest of the batch).
#: ``sample``: each sample on its own (independent of the batch and of the DDP split).
#: ``channel``: each (sample, channel) pair, for (N, C, ...) inputs.
#: ``global``: the whole tensor on every DDP rank (all-reduced), so that N ranks drop exactly
#: what one process would drop on the concatenated batch.
SCOPES = ("tensor", "sample", "channel", "global")
_MIN_NDIM = {"tensor": 1, "sample": 2, "channel": 3, "global": 1}


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float in [0, 1], else a ValueError naming ``name`` (p, rate, h_ratio) and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def check_scope(scope: object, ndim: int | None = None) -> str:
    """``scope`` if it is in :data:`SCOPES` (and an ``ndim``-dim input has enough dims for it), else a ValueError."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; allowed: {', '.join(map(repr, SCOPES))}")
    if ndim is not None and ndim < _MIN_NDIM[scope]:
        shapes = {1: "(N, ...)", 2: "(N, F) or (N, C, ...)", 3: "(N, C, L), (N, C, H, W), ..."}
        raise ValueError(
            f"scope {scope!r} needs an input with at least {_MIN_NDIM[scope]} dims "
            f"{shapes[_MIN_NDIM[scope]]}, got a {ndim}-dim input"
        )
    return scope


def zero_where(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with the elements where ``mask`` (broadcast against ``x``) is True set to 0, NaN and inf included.

    One pass forward and one backward; ``masked_fill`` copies x and then fills the copy.
    """
    return torch.where(mask, x.new_zeros(()), x)


class DropStats(nn.Module):
    """Drop counters and the eval switch shared by the maxdrop layers.

    After each training forward: ``last_dropped`` (a new 0-dim int64 tensor on the input's
    device, so reading it needs no host-device sync until you call ``.item()``) and ``last_seen``
    (a Python int, fixed for a given input shape). ``dropped_total`` / ``seen_total`` (0-dim
    int64 tensors, None before the first training forward) add up since :meth:`reset_drop_stats`.
    Growing totals are tensors, not Python ints, so that a ``torch.compile``d layer is not
    recompiled on every call. The counters are plain attributes, not buffers, so DDP never
    broadcasts rank 0's values over the other ranks' counts.

    Args:
        active_in_eval: keep dropping in eval mode.
        track_stats: record the drop counts of each training forward.
    """

    def __init__(self, active_in_eval: bool = False, track_stats: bool = True) -> None:
        super().__init__()
        self.active_in_eval = bool(active_in_eval)
        self.track_stats = bool(track_stats)
        self.reset_drop_stats()

    def reset_drop_stats(self) -> None:
        self.last_dropped: Tensor | None = None
        self.last_seen = 0
        self.dropped_total: Tensor | None = None
        self.seen_total: Tensor | None = None

    def _drops(self) -> bool:
        """Whether the layer drops anything in its current mode (training, or eval with ``active_in_eval``)."""
        return self.training or self.active_in_eval

    def _record(self, dropped: Tensor, seen: int) -> None:
        self.last_dropped = dropped
        self.last_seen = seen
        if self.dropped_total is None:
            self.dropped_total, self.seen_total = dropped, torch.full_like(dropped, seen)
        else:
            self.dropped_total, self.seen_total = self.dropped_total + dropped, self.seen_total + seen

    def _eval_repr(self) -> str:
        return ", active_in_eval=True" if self.active_in_eval else ""


class MaskDropLayer(DropStats):
    """A layer that zeroes the elements of a boolean mask computed from its input.

    Subclasses set :attr:`fraction_name` and implement :meth:`drop_mask`; they may override
    :meth:`apply_mask` (e.g. to rescale the kept elements).
    """

    #: The attribute holding the drop fraction; 0 makes ``forward`` an exact identity.
    fraction_name = "p"

    def drop_mask(self, x: Tensor) -> Tensor:
        """Boolean mask (True = dropped) of ``x``'s shape or broadcastable to it; checks ``x`` first."""
        raise NotImplementedError

    def apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        """The output: ``x`` with the masked elements zeroed (kept ones unchanged, not rescaled)."""
        return x.masked_fill(mask, 0)

    def forward(self, x: Tensor) -> Tensor:
        if not self._drops() or getattr(self, self.fraction_name) == 0.0:
            return x
        mask = self.drop_mask(x)
        if self.training and self.track_stats:
            # A mask broadcast over some dims (a spatial map, whole rows) drops every element along them.
            spread = 1
            for n, m in zip(x.shape, mask.shape, strict=True):  # a loop, not a generator: torch.compile
                spread *= n if m == 1 else 1
            dropped = torch.count_nonzero(mask)
            self._record(dropped * spread if spread != 1 else dropped, x.numel())
        return self.apply_mask(x, mask)
