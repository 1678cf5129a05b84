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
  flows through ``sigmoid(mean(x))`` (computed by ``attention_drop._ImportanceProduct``, equal to autograd's up
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

from maxdrop.layers.attention_drop import (
    AttentionDropLayer,
    attention_map,
    check_attention_input,
    draw_drop_branch,
    dropped_positions,
    importance_product,
)
from maxdrop.layers.base import check_fraction, zero_where

__all__ = ["ADL", "adl", "adl_drop_mask", "adl_importance_map", "adl_uses_drop_mask"]


def adl_drop_mask(x: Tensor, drop_threshold: float = 0.8) -> Tensor:
    """ADL's drop mask as a bool (N, 1, H, W) tensor: True = position zeroed in every channel.

    Args:
        x: input of shape (N, C, H, W).
        drop_threshold: in [0, 1]; positions whose channel mean is >= ``drop_threshold`` times the
            sample's maximum channel mean are dropped.
    """
    drop_threshold = check_fraction(drop_threshold, "drop_threshold")
    check_attention_input(x, "ADL")
    return dropped_positions(attention_map(x), drop_threshold)


def adl_importance_map(x: Tensor) -> Tensor:
    """ADL's importance map ``sigmoid(mean over channels of x)``, shape (N, 1, H, W), in ``x``'s dtype."""
    check_attention_input(x, "ADL")
    return torch.sigmoid(attention_map(x))


def adl_uses_drop_mask(drop_rate: float, generator: torch.Generator | None = None) -> bool:
    """One draw of ADL's branch: True = drop mask, False = importance map.

    Draws one float32 number ``u`` from the CPU generator (``generator`` or the default one) and
    returns ``floor(u + drop_rate) >= 1`` computed in float32, as the official layer does.
    """
    drop_rate = check_fraction(drop_rate, "drop_rate")
    return draw_drop_branch(drop_rate, generator)


def _apply(x: Tensor, drop_threshold: float, use_drop: bool) -> tuple[Tensor, Tensor | None]:
    """(output, dropped positions or None in the importance branch) for a validated 4-dim ``x``."""
    if use_drop:
        dropped = dropped_positions(attention_map(x), drop_threshold)
        return zero_where(x, dropped), dropped
    return importance_product(x), None


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
    check_attention_input(x, "ADL")
    if not training:
        return x
    return _apply(x, drop_threshold, draw_drop_branch(drop_rate, generator))[0]


class ADL(AttentionDropLayer):
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
        super().__init__(drop_rate, active_in_eval, track_stats)
        self.drop_threshold = check_fraction(drop_threshold, "drop_threshold")

    def branch(self, x: Tensor, use_drop: bool, count: bool) -> tuple[Tensor, Tensor | None]:
        y, dropped = _apply(x, self.drop_threshold, use_drop)
        if not count:
            return y, None
        if dropped is None:  # the importance map zeroes nothing
            return y, torch.zeros((), dtype=torch.int64, device=x.device)
        return y, torch.count_nonzero(dropped) * x.shape[1]

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, drop_threshold={self.drop_threshold}" + self._eval_repr()
