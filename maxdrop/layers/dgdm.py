"""DGDM, the Dual-attention Guided Dropblock Module (Yin, Zhang, Chang, Ma, Guo; ICPR 2020, arXiv:2003.04719).

Two parts, both computed from the layer's input x of shape (N, C, H, W), per sample:

CAGD, channel-attention guided dropout::

    a_c   = mean over (H, W) of x[c]                      # channel attention, (N, C)
    top   = the k = round(top_k_ratio * C) channels of largest a_c
    drop channel c  if  c in top  and  u_c < channel_drop_rate      # u ~ U[0, 1), one per (sample, channel)

SAGD, spatial-attention guided dropblock::

    s     = mean over channels of x                       # spatial attention, (N, 1, H, W) (ADL's map)
    seeds = s >= drop_threshold * max over (H, W) of s    # the most discriminative positions
    block = seeds dilated by a block_size x block_size square (centred, clipped at the border)
    one draw per step: with probability drop_rate zero the blocks in every channel,
                       else multiply every position by sigmoid(s)        (ADL's importance map)

Output: ``x`` with the dropped channels zeroed and, in the drop branch, the blocks zeroed; in the
other branch ``x * sigmoid(s)`` with the dropped channels zeroed. Nothing is rescaled.

The authors' code is not public and the paper's method section was not available here (only its
abstract and introduction: "CAGD ranks the channel attentions and treats the top-k attentions with the
largest magnitudes as the important ones. It also keeps some low-valued elements ...; SAGD ... erasing
the contiguous regions of feature maps rather than individual pixels"); an unofficial TensorFlow
version builds on ADL (channel-mean map, max-relative threshold, drop mask or importance map chosen by
one draw) and drops channel attentions with plain dropout. Rules chosen here, and why:

1. Channel attention = global average pooling, without a learned excitation (SE) network: the layer
   stays parameter-free like every other slot layer, and the ranking is what CAGD uses.
2. Only the top-k channels are candidates, each dropped independently with probability
   ``channel_drop_rate``; the other channels are always kept ("keeps some low-valued elements" so
   that they can grow). Ties in ``a_c`` are broken by a stable sort: the lower channel index ranks
   higher. ``k`` rounds half to even (Python's ``round``); ``k = 0`` drops no channel.
3. Spatial attention = channel mean and seeds = ``s >= drop_threshold * max`` (ADL's rule, which
   DGDM's spatial part extends; the comparison is ADL's ``not (s < threshold)``).
4. Blocks: each seed is the centre of a ``block_size`` square (max pooling, stride 1), so the
   erased region is contiguous and contains every seed; ``block_size`` must be odd so that the square
   has a centre; ``block_size=1`` is ADL's drop mask.
5. The drop-mask / importance-map choice is ADL's (one CPU draw per step, ``floor(u + drop_rate) >=
   1``); ``drop_rate=1`` always erases blocks.
6. Both attentions are computed from the input (not SAGD after CAGD), so the two rules are
   independent and one pass over x serves both.
7. All random numbers come from the CPU generator (one branch number, then N x C channel numbers), so
   a seed gives the same masks on the CPU and on a GPU.

DDP: both masks are per sample and the branch is one number per step; ranks seeded alike draw alike
while they consume their CPU streams alike; nothing synchronizes them. The masks do not depend on how
the batch is split, given the draws.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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

__all__ = ["DualAttentionDropBlock", "cagd_channel_mask", "dual_attention_drop_block", "sagd_block_mask"]

_NAME = "DualAttentionDropBlock"


def _check_block_size(block_size: object) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or block_size % 2 == 0:
        raise ValueError(f"block_size must be an odd int >= 1 (a square with a centre), got {block_size!r}")
    return block_size


def _channel_mask(x: Tensor, top_k_ratio: float, channel_drop_rate: float, uniforms: Tensor) -> Tensor:
    """(N, C, 1, 1) bool for validated arguments; ``uniforms``: (N, C) numbers in [0, 1) on any device."""
    n, c = x.shape[:2]
    k = round(top_k_ratio * c)
    mask = torch.zeros((n, c), dtype=torch.bool, device=x.device)
    if k == 0 or channel_drop_rate == 0.0 or x.numel() == 0:
        return mask.reshape(n, c, 1, 1)
    with torch.no_grad():
        attention = x.detach().mean(dim=(2, 3))
        order = torch.argsort(attention, dim=1, descending=True, stable=True)
        top = order[:, :k]
        hit = uniforms.to(x.device).gather(1, top) < channel_drop_rate
        mask.scatter_(1, top, hit)
    return mask.reshape(n, c, 1, 1)


def _block_mask(attention: Tensor, drop_threshold: float, block_size: int) -> Tensor:
    seeds = dropped_positions(attention, drop_threshold)
    if block_size == 1 or seeds.numel() == 0:
        return seeds
    # max pooling of 0/1 dilates: a position is erased when a seed lies within block_size // 2 of it
    pooled = F.max_pool2d(seeds.to(torch.float32), block_size, stride=1, padding=block_size // 2)
    return pooled > 0


def cagd_channel_mask(
    x: Tensor, top_k_ratio: float = 0.5, channel_drop_rate: float = 0.25, uniforms: Tensor | None = None
) -> Tensor:
    """CAGD's mask, bool (N, C, 1, 1): True = channel dropped in that sample.

    Args:
        x: input of shape (N, C, H, W).
        top_k_ratio: fraction of the channels (largest spatial mean first) that are candidates.
        channel_drop_rate: probability that a candidate channel is dropped.
        uniforms: (N, C) numbers in [0, 1), one per (sample, channel); None draws them from the CPU
            default generator.
    """
    top_k_ratio = check_fraction(top_k_ratio, "top_k_ratio")
    channel_drop_rate = check_fraction(channel_drop_rate, "channel_drop_rate")
    check_attention_input(x, _NAME)
    if uniforms is None:
        uniforms = torch.rand(x.shape[:2])
    if tuple(uniforms.shape) != tuple(x.shape[:2]):
        raise ValueError(f"uniforms must have shape (N, C) = {tuple(x.shape[:2])}, got {tuple(uniforms.shape)}")
    return _channel_mask(x, top_k_ratio, channel_drop_rate, uniforms)


def sagd_block_mask(x: Tensor, drop_threshold: float = 0.8, block_size: int = 3) -> Tensor:
    """SAGD's block mask, bool (N, 1, H, W): True = position erased in every channel (drop branch)."""
    drop_threshold = check_fraction(drop_threshold, "drop_threshold")
    block_size = _check_block_size(block_size)
    check_attention_input(x, _NAME)
    return _block_mask(attention_map(x), drop_threshold, block_size)


def _apply(
    x: Tensor, args: tuple[float, float, float, int], use_drop: bool, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(output, channel mask, block mask or None in the importance branch) for validated arguments."""
    top_k_ratio, channel_drop_rate, drop_threshold, block_size = args
    channels = _channel_mask(x, top_k_ratio, channel_drop_rate, uniforms)
    if use_drop:
        blocks = _block_mask(attention_map(x), drop_threshold, block_size)
        return zero_where(x, channels | blocks), channels, blocks
    # in place: the product is a fresh tensor that its backward does not read
    return importance_product(x).masked_fill_(channels, 0), channels, None


def _draws(drop_rate: float, shape: torch.Size, generator: torch.Generator | None) -> tuple[bool, Tensor]:
    use_drop = draw_drop_branch(drop_rate, generator)
    return use_drop, torch.rand(shape[:2], generator=generator)  # after the branch draw, as in forward


def dual_attention_drop_block(
    x: Tensor,
    top_k_ratio: float = 0.5,
    channel_drop_rate: float = 0.25,
    drop_rate: float = 0.75,
    drop_threshold: float = 0.8,
    block_size: int = 3,
    training: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Functional DGDM (CAGD + SAGD), see the module docstring for the rules.

    Args:
        x: input of shape (N, C, H, W), any float dtype.
        top_k_ratio, channel_drop_rate: CAGD's candidates and their drop probability, in [0, 1].
        block_size: odd edge of the square erased around each seed.
        drop_rate, drop_threshold, training, generator: as for :func:`~maxdrop.layers.adl.adl`; the
            drop branch erases SAGD's blocks, and the generator also draws CAGD's (N, C) numbers.

    Returns:
        Tensor of the same shape and dtype as ``x``.
    """
    args = _check_args(top_k_ratio, channel_drop_rate, drop_rate, drop_threshold, block_size)
    check_attention_input(x, _NAME)
    if not training:
        return x
    use_drop, uniforms = _draws(args[2], x.shape, generator)
    return _apply(x, (args[0], args[1], args[3], args[4]), use_drop, uniforms)[0]


def _check_args(
    top_k_ratio: object, channel_drop_rate: object, drop_rate: object, drop_threshold: object, block_size: object
) -> tuple[float, float, float, float, int]:
    return (
        check_fraction(top_k_ratio, "top_k_ratio"),
        check_fraction(channel_drop_rate, "channel_drop_rate"),
        check_fraction(drop_rate, "drop_rate"),
        check_fraction(drop_threshold, "drop_threshold"),
        _check_block_size(block_size),
    )


class DualAttentionDropBlock(AttentionDropLayer):
    """DGDM (Yin et al., ICPR 2020): channel-attention guided dropout + spatial-attention guided dropblock.

    Args:
        top_k_ratio: fraction of the channels, by largest spatial mean, that CAGD may drop.
        channel_drop_rate: probability that each of those channels is dropped (per sample).
        drop_rate: probability of SAGD's block-erasing branch per training step (else ADL's
            importance map ``sigmoid(channel mean)`` multiplies the input).
        drop_threshold: SAGD seeds: positions whose channel mean is >= this times the sample's maximum.
        block_size: odd edge of the square erased around each seed (1 = ADL's drop mask).
        active_in_eval: keep applying the layer in eval mode (off at test time by default).
        track_stats: record drop counts: ``last_dropped`` counts the elements zeroed by either mask
            (dropped channels x H x W plus erased positions x C, each element once); a step in the
            importance branch counts only the dropped channels. ``last_used_drop_mask`` tells the branch.

    Shape:
        Input (N, C, H, W); output: same shape and dtype.
    """

    def __init__(
        self,
        top_k_ratio: float = 0.5,
        channel_drop_rate: float = 0.25,
        drop_rate: float = 0.75,
        drop_threshold: float = 0.8,
        block_size: int = 3,
        active_in_eval: bool = False,
        track_stats: bool = True,
    ) -> None:
        args = _check_args(top_k_ratio, channel_drop_rate, drop_rate, drop_threshold, block_size)
        super().__init__(drop_rate, active_in_eval, track_stats)
        self.top_k_ratio, self.channel_drop_rate, _, self.drop_threshold, self.block_size = args

    def branch(self, x: Tensor, use_drop: bool, count: bool) -> tuple[Tensor, Tensor | None]:
        uniforms = torch.rand(x.shape[:2])  # CAGD's draws come after the branch draw
        args = (self.top_k_ratio, self.channel_drop_rate, self.drop_threshold, self.block_size)
        y, channels, blocks = _apply(x, args, use_drop, uniforms)
        return y, (_count(x, channels, blocks) if count else None)

    def extra_repr(self) -> str:
        return (
            f"top_k_ratio={self.top_k_ratio}, channel_drop_rate={self.channel_drop_rate}, "
            f"drop_rate={self.drop_rate}, drop_threshold={self.drop_threshold}, block_size={self.block_size}"
        ) + self._eval_repr()


def _count(x: Tensor, channels: Tensor, blocks: Tensor | None) -> Tensor:
    """Elements zeroed by the union of the two masks, without materializing it."""
    dropped_channels = channels.reshape(x.shape[0], -1).sum(1)  # (N,)
    total = dropped_channels.sum() * (x.shape[2] * x.shape[3])
    if blocks is not None:
        positions = blocks.reshape(x.shape[0], -1).sum(1)
        total = total + (positions * (x.shape[1] - dropped_channels)).sum()
    return total
