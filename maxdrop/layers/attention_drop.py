"""What ADL and DGDM share: the channel-mean attention map, ADL's max-relative drop rule, the branch
draw, the importance product, and :class:`AttentionDropLayer`, their module frame.

Both layers draw, once per training forward, which of two branches they apply to an (N, C, H, W)
input: a drop mask (zeroes the most attended positions) or the importance map (multiplies by
``sigmoid(channel mean)``). See ``adl.py`` for the exact rules and their sources.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maxdrop.layers.base import DropStats, check_fraction

__all__ = [
    "AttentionDropLayer",
    "attention_map",
    "check_attention_input",
    "draw_drop_branch",
    "dropped_positions",
    "importance_product",
]


def check_attention_input(x: Tensor, name: str) -> None:
    """A ValueError naming layer ``name`` unless ``x`` is (N, C, H, W)."""
    if x.ndim != 4:
        raise ValueError(f"{name} expects an (N, C, H, W) input, got shape {tuple(x.shape)}")


def attention_map(x: Tensor) -> Tensor:
    """(N, 1, H, W) channel mean in the input's dtype (``torch.mean``, as the official code)."""
    return torch.mean(x, dim=1, keepdim=True)


def dropped_positions(attention: Tensor, drop_threshold: float) -> Tensor:
    """(N, 1, H, W) bool, True where ``attention >= drop_threshold * per-sample max`` (i.e. not kept)."""
    n = attention.shape[0]
    if attention.numel() == 0:
        return torch.zeros_like(attention, dtype=torch.bool)
    with torch.no_grad():
        a = attention.detach()
        threshold = a.reshape(n, -1).amax(dim=1).reshape(n, 1, 1, 1) * drop_threshold
        return ~(a < threshold)  # NaN attention compares False: dropped, as their mask gives 0 there


def draw_drop_branch(drop_rate: float, generator: torch.Generator | None) -> bool:
    """One float32 ``u`` from the CPU generator; True (the drop mask) when ``fl32(u + drop_rate) >= 1``."""
    u = torch.rand([], dtype=torch.float32, generator=generator)  # CPU: no host-device sync
    return bool((u + drop_rate).floor() >= 1)


class _ImportanceProduct(torch.autograd.Function):
    """``x * sigmoid(mean over channels of x)``: autograd's forward, a leaner backward.

    The forward runs the official ops. Autograd's own backward of that expression holds ``g * s``,
    ``g * x`` and the expanded mean gradient at full size at once (4 x the input at its peak); here
    the channel sum of ``g * x`` is reduced first and the result added in place, so at most one
    full-size temporary lives beside the output. Same gradient, up to the order of the additions.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        s = torch.sigmoid(attention_map(x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        x, s = ctx.saved_tensors
        # d/dx_c of x_c' * sigmoid(mean(x)): s on the diagonal, plus sum_c' g x_c' * s (1 - s) / C
        through_attention = (g * x).sum(dim=1, keepdim=True) * (s * (1 - s)) / x.shape[1]
        return (g * s).add_(through_attention)


def importance_product(x: Tensor) -> Tensor:
    """``x * sigmoid(channel mean of x)``, same shape and dtype as the (N, C, H, W) ``x``."""
    return _ImportanceProduct.apply(x)


class AttentionDropLayer(DropStats):
    """The frame of ADL and DGDM: eval identity, one branch draw per forward, drop counters.

    A subclass implements :meth:`branch`. ``forward`` returns ``x`` unchanged in eval (unless
    ``active_in_eval``); otherwise it checks ``x``, draws the branch from torch's default CPU generator
    (``drop_rate`` is its probability), applies it and, in training, records which branch ran
    (``last_used_drop_mask``) and how many elements it zeroed. ``drop_rate=0`` is *not* the identity:
    every step then uses the importance map.
    """

    def __init__(self, drop_rate: float, active_in_eval: bool = False, track_stats: bool = True) -> None:
        super().__init__(active_in_eval, track_stats)
        self.drop_rate = check_fraction(drop_rate, "drop_rate")
        self.last_used_drop_mask: bool | None = None

    def branch(self, x: Tensor, use_drop: bool, count: bool) -> tuple[Tensor, Tensor | None]:
        """(output, number of zeroed elements as a 0-dim int64 tensor, or None when not ``count``)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if not self._drops():
            return x
        check_attention_input(x, type(self).__name__)
        use_drop = draw_drop_branch(self.drop_rate, None)
        record = self.training and self.track_stats
        y, dropped = self.branch(x, use_drop, record)
        if self.training:
            self.last_used_drop_mask = use_drop
            if record:
                self._record(dropped, x.numel())
        return y
