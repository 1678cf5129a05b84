"""ADL, the Attention-based Dropout Layer (Choe and Shim, CVPR 2019).

In training, for an input (N, C, H, W), per sample::

    attention  = mean over channels of x                       # (N, 1, H, W), the self-attention map
    keep       = attention < drop_threshold * max(attention)   # max over (H, W) of that sample
    importance = sigmoid(attention)
    y = x * keep         with probability drop_rate      (the drop mask: the most attended positions
    y = x * importance   otherwise                        are zeroed in every channel)

One random number decides the branch for the whole batch, once per training forward. This is the
rule of the official code (junsukchoe/ADL ``ops.py``, TensorFlow; clovaai/wsolevaluation
``wsol/method/adl.py``, PyTorch), transcribed:

- comparison: ``attention < threshold`` keeps (strictly less), so positions *equal* to the
  threshold are dropped, the maximum always among them when it is positive. When a sample's maximum
  is negative the threshold lies above it and nothing is dropped; when it is 0, every position at 0
  is dropped.
- the draw: ``floor(u + drop_rate)`` with ``u = torch.rand([], dtype=float32)`` from the CPU's
  default generator (wsolevaluation), i.e. the drop mask is used when ``fl32(u + drop_rate) >= 1``.
  Here the same number is drawn from the same generator (or from ``generator``), one per training
  forward and also when ``drop_rate`` is 0 or 1, so a model consumes the random stream exactly as the
  official layer does. Their ``floor`` can give 2 for ``drop_rate=1`` (``u = 1 - 2**-24`` rounds up);
  here any value >= 1 selects the drop mask.
- eval: the identity (their ``forward`` returns the input when not training).
- gradient: neither map is detached, as in their code: in the importance branch the gradient also
  flows through ``sigmoid(mean(x))`` (computed by :class:`_ImportanceProduct`, equal to autograd's up
  to the order of the additions); the drop mask (a comparison) carries none.

Differences, on purpose: the output keeps the input's dtype (theirs multiplies by a float32 map, so
a float16 input comes out float32); in the drop branch dropped elements are set to zero (theirs
multiplies by 0, so NaN and inf stay NaN); otherwise the output is bitwise theirs.

Relation to MaxDropout: the drop branch is a spatial MaxDropout with a max-relative threshold on the
channel-*mean* map (MaxDropoutV2 uses the channel sum with a min-max normalized threshold), applied
only with probability ``drop_rate``.

DDP: the masks are per sample, so for a given branch the output does not depend on how the batch is
split. The branch is drawn on each rank from its own CPU generator; nothing synchronizes it. Ranks
seeded alike (``seed_everything``) draw the same numbers as long as they have consumed the CPU stream
alike; pass a ``generator`` to decide explicitly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maxdrop.layers.base import DropStats, check_fraction, zero_where

__all__ = ["ADL", "adl", "adl_drop_mask", "adl_importance_map", "adl_uses_drop_mask"]


def _check_input(x: Tensor, name: str = "ADL") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} expects an (N, C, H, W) input, got shape {tuple(x.shape)}")


def _attention(x: Tensor) -> Tensor:
    """(N, 1, H, W) channel mean in the input's dtype (``torch.mean``, as the official code)."""
    return torch.mean(x, dim=1, keepdim=True)


def _dropped_positions(attention: Tensor, drop_threshold: float) -> Tensor:
    """(N, 1, H, W) bool, True where ``attention >= drop_threshold * per-sample max`` (i.e. not kept)."""
    n = attention.shape[0]
    if attention.numel() == 0:
        return torch.zeros_like(attention, dtype=torch.bool)
    with torch.no_grad():
        a = attention.detach()
        threshold = a.reshape(n, -1).amax(dim=1).reshape(n, 1, 1, 1) * drop_threshold
        return ~(a < threshold)  # NaN attention compares False: dropped, as their mask gives 0 there


def adl_drop_mask(x: Tensor, drop_threshold: float = 0.8) -> Tensor:
    """ADL's drop mask as a bool (N, 1, H, W) tensor: True = position zeroed in every channel.

    Args:
        x: input of shape (N, C, H, W).
        drop_threshold: in [0, 1]; positions whose channel mean is >= ``drop_threshold`` times the
            sample's maximum channel mean are dropped.
    """
    drop_threshold = check_fraction(drop_threshold, "drop_threshold")
    _check_input(x)
    return _dropped_positions(_attention(x), drop_threshold)


def adl_importance_map(x: Tensor) -> Tensor:
    """ADL's importance map ``sigmoid(mean over channels of x)``, shape (N, 1, H, W), in ``x``'s dtype."""
    _check_input(x)
    return torch.sigmoid(_attention(x))


def adl_uses_drop_mask(drop_rate: float, generator: torch.Generator | None = None) -> bool:
    """One draw of ADL's branch: True = drop mask, False = importance map.

    Draws one float32 number ``u`` from the CPU generator (``generator`` or the default one) and
    returns ``floor(u + drop_rate) >= 1`` computed in float32, as the official layer does.
    """
    drop_rate = check_fraction(drop_rate, "drop_rate")
    return _draw(drop_rate, generator)


def _draw(drop_rate: float, generator: torch.Generator | None) -> bool:
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
        s = torch.sigmoid(_attention(x))
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        x, s = ctx.saved_tensors
        # d/dx_c of x_c' * sigmoid(mean(x)): s on the diagonal, plus sum_c' g x_c' * s (1 - s) / C
        through_attention = (g * x).sum(dim=1, keepdim=True) * (s * (1 - s)) / x.shape[1]
        return (g * s).add_(through_attention)


def _importance_product(x: Tensor) -> Tensor:
    return _ImportanceProduct.apply(x)


def _apply(x: Tensor, drop_threshold: float, use_drop: bool) -> tuple[Tensor, Tensor | None]:
    """(output, dropped positions or None in the importance branch) for a validated 4-dim ``x``."""
    if use_drop:
        dropped = _dropped_positions(_attention(x), drop_threshold)
        return zero_where(x, dropped), dropped
    return _importance_product(x), None


def adl(
    x: Tensor,
    drop_rate: float = 0.75,
    drop_threshold: float = 0.8,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional ADL.

    Args:
        x: input of shape (N, C, H, W), any float dtype.
        drop_rate: probability in [0, 1] that this call uses the drop mask (else the importance map).
        drop_threshold: in [0, 1], relative to each sample's maximum of the channel-mean map.
        training: when False, returns ``x`` unchanged (and draws nothing).
        generator: CPU generator of the branch draw; None = torch's default generator.

    Returns:
        Tensor of the same shape and dtype as ``x``: ``x`` with the most attended positions zeroed
        in every channel, or ``x * sigmoid(channel mean)``. Not rescaled.
    """
    drop_rate = check_fraction(drop_rate, "drop_rate")
    drop_threshold = check_fraction(drop_threshold, "drop_threshold")
    _check_input(x)
    if not training:
        return x
    return _apply(x, drop_threshold, _draw(drop_rate, generator))[0]


class ADL(DropStats):
    """Attention-based Dropout Layer (Choe and Shim, CVPR 2019) for (N, C, H, W) feature maps.

    Each training forward draws one number: with probability ``drop_rate`` the positions whose
    channel mean reaches ``drop_threshold`` times the sample's maximum are zeroed in every channel;
    otherwise every position is multiplied by the sigmoid of its channel mean. See the module
    docstring for the exact rule, the random draw and the behaviour under DDP.

    Note: ``drop_rate=0`` is *not* the identity (every step uses the importance map); only eval mode
    is.

    Args:
        drop_rate: probability of the drop-mask branch, in [0, 1] (the official default 0.75).
        drop_threshold: in [0, 1] (the official default 0.8).
        active_in_eval: keep applying the layer in eval mode (the official layer is off at test time).
        track_stats: record drop counts. ``last_dropped`` counts the elements set to zero by the drop
            mask (positions x C); a step that uses the importance map zeroes nothing and records 0.
            ``last_used_drop_mask`` tells which branch the last training forward used.

    Shape:
        Input (N, C, H, W); output: same shape and dtype.
    """

    def __init__(
        self,
        drop_rate: float = 0.75,
        drop_threshold: float = 0.8,
        active_in_eval: bool = False,
        track_stats: bool = True,
    ) -> None:
        super().__init__()
        self.drop_rate = check_fraction(drop_rate, "drop_rate")
        self.drop_threshold = check_fraction(drop_threshold, "drop_threshold")
        self.active_in_eval = bool(active_in_eval)
        self.track_stats = bool(track_stats)
        self.last_used_drop_mask: bool | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or self.active_in_eval):
            return x
        _check_input(x)
        use_drop = _draw(self.drop_rate, None)
        y, dropped = _apply(x, self.drop_threshold, use_drop)
        if self.training:
            self.last_used_drop_mask = use_drop
            if self.track_stats:
                count = torch.zeros((), dtype=torch.int64, device=x.device)
                if dropped is not None:
                    count = torch.count_nonzero(dropped) * x.shape[1]
                self._record(count, x.numel())
        return y

    def extra_repr(self) -> str:
        s = f"drop_rate={self.drop_rate}, drop_threshold={self.drop_threshold}"
        return s + (", active_in_eval=True" if self.active_in_eval else "")
