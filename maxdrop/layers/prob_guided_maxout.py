"""Probability Guided Maxout: drop more of the most active units the better a sample is classified.

Ferrari, Berretti and Del Bimbo, "Probability Guided Maxout", ICPR 2020. Their code applies it
to the pooled descriptor (N, D) right before the final linear classifier, in training only.
Per sample ``i`` with true class ``y_i``::

    q_i    = softmax(classifier(detached x_i))[y_i]     # no gradient through this
    keep_i = 1 - q_i / 2                                # keep fraction, in [0.5, 1]
    n_i    = round(D * keep_i)                          # units kept (round half to even)
    y_i    = x_i * scale / keep_i  on the n_i smallest units of x_i,  0 on the D - n_i others

``scale`` is one learnable scalar initialised to 1. A well classified sample (q near 1) loses
its most active half; a misclassified one (q near 0) keeps nearly all of its units.

Tie rule: the units of a sample are ranked by a *stable* ascending sort, i.e. among equal values
the one with the lower index counts as smaller and is kept first. So exactly ``D - n_i`` units are
dropped per sample, ties or not. (The authors' ``argsort`` leaves the order of ties unspecified.)

Arithmetic: ``q``, ``keep`` and ``D * keep`` are float32 (as in the authors' code); ``n_i`` is
that product rounded half to even (``torch.round``, like Python's ``round``). A non-finite ``q``
(NaN or inf in the descriptor or the logits) counts as 0: nothing of that sample is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from maxdrop.layers.base import DropStats

__all__ = ["ProbGuidedMaxout", "prob_guided_keep_fraction", "prob_guided_maxout", "prob_guided_maxout_mask"]


def _check_descriptor(x: Tensor, targets: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(
            f"ProbGuidedMaxout expects a pooled descriptor of shape (N, D), got shape {tuple(x.shape)}; "
            "it belongs in a backbone's `head` slot"
        )
    n = x.shape[0]
    if targets.shape != (n,) or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise ValueError(
            f"targets must be class indices of shape (N,) = ({n},) and an integer dtype, got shape "
            f"{tuple(targets.shape)} and dtype {targets.dtype}"
        )


def _check_logits(x: Tensor, logits: Tensor) -> None:
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"logits must have shape (N, num_classes) with N = {x.shape[0]}, got shape {tuple(logits.shape)}"
        )


def _check_inputs(x: Tensor, logits: Tensor, targets: Tensor) -> None:
    _check_descriptor(x, targets)
    _check_logits(x, logits)


def prob_guided_keep_fraction(logits: Tensor, targets: Tensor) -> Tensor:
    """Keep fraction ``1 - q/2`` per sample, float32 (N,), where ``q`` is the true class's softmax probability.

    Args:
        logits: (N, num_classes) classifier output (any float dtype; the softmax runs in float32).
        targets: (N,) integer class indices in ``[0, num_classes)``.

    Returns:
        float32 (N,) in [0.5, 1], without gradient. A non-finite ``q`` gives 1 (keep everything).
    """
    with torch.no_grad():
        q = logits.detach().float().softmax(dim=1).gather(1, targets.long()[:, None]).squeeze(1)
        q = torch.where(torch.isfinite(q), q, torch.zeros_like(q))
        return 1.0 - q * 0.5


def _keep_mask(x: Tensor, keep_fraction: Tensor) -> Tensor:
    """True where a unit is kept: the ``round(D * keep_fraction)`` smallest of each row (stable ranks)."""
    n, d = x.shape
    with torch.no_grad():
        n_keep = torch.round(keep_fraction * d)  # float32, half to even
        order = torch.sort(x.detach(), dim=1, stable=True).indices  # ascending, ties by index
        kept_rank = torch.arange(d, device=x.device).expand(n, d) < n_keep[:, None]
        return torch.empty_like(kept_rank).scatter_(1, order, kept_rank)


def prob_guided_maxout_mask(x: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """Boolean mask of the units Probability Guided Maxout drops (True = dropped).

    Args:
        x: (N, D) descriptor.
        logits: (N, num_classes): the classifier applied to (a detached copy of) ``x``.
        targets: (N,) integer true classes.

    Returns:
        Tensor of shape (N, D) and dtype ``torch.bool``; row ``i`` has ``D - round(D (1 - q_i / 2))`` True.
    """
    _check_inputs(x, logits, targets)
    return ~_keep_mask(x, prob_guided_keep_fraction(logits, targets))


def _apply(x: Tensor, keep: Tensor, keep_fraction: Tensor, scale: Tensor | float) -> Tensor:
    factor = (scale / keep_fraction).to(x.dtype)[:, None]  # (N, 1); carries the gradient of `scale`
    return x.masked_fill(~keep, 0) * factor


def prob_guided_maxout(
    x: Tensor, logits: Tensor, targets: Tensor, scale: Tensor | float = 1.0, training: bool = True
) -> Tensor:
    """Functional Probability Guided Maxout.

    Args:
        x: (N, D) descriptor, any float dtype.
        logits: (N, num_classes): the classifier applied to a detached copy of ``x``; no gradient
            flows into them.
        targets: (N,) integer true classes in ``[0, num_classes)``.
        scale: multiplier of the kept units (a 0-dim tensor, e.g. a learnable parameter, or a float).
        training: when False, returns ``x`` unchanged.

    Returns:
        (N, D), dtype of ``x``: the kept units times ``scale / keep_fraction``, the dropped units 0.
        The gradient is zero on dropped units and ``scale / keep_fraction`` on kept ones.
    """
    _check_inputs(x, logits, targets)
    if not training:
        return x
    keep_fraction = prob_guided_keep_fraction(logits, targets)
    return _apply(x, _keep_mask(x, keep_fraction), keep_fraction, scale)


class ProbGuidedMaxout(DropStats):
    """Probability Guided Maxout (Ferrari et al., ICPR 2020) for a backbone's ``head`` slot.

    Drops, per sample, the ``D - round(D (1 - q/2))`` most active units of the (N, D) descriptor,
    where ``q`` is the softmax probability the classifier gives the sample's true class, and
    multiplies the kept units by ``scale / (1 - q/2)`` (see the module docstring for the exact
    rule and the tie rule).

    It needs the targets and the classifier, so it declares ``needs_targets = True`` and is called
    as ``layer(x, targets, classifier)``: the maxdrop backbones do that for their ``head`` slot
    when their forward gets ``targets``, and :class:`maxdrop.module.ClassificationModule` passes
    them in ``training_step`` only (docs/models.md, "Layers that need the targets"). The
    classifier is called once more, under ``no_grad``, on a detached copy of ``x``.

    Args:
        active_in_eval: keep dropping in eval mode. Off by default: the rule reads the true label,
            so applying it to test predictions would leak the label into them. When on, an eval
            forward needs ``targets`` too (the ClassificationModule passes none outside training).
        track_stats: record drop counts (``last_dropped``, ``dropped_total``, ...; see
            :class:`maxdrop.layers.base.DropStats`), which ``SparsityMonitor`` reads.

    Attributes:
        scale: learnable 0-dim parameter, initialised to 1.

    Shape:
        Input (N, D) descriptor, (N,) targets; output (N, D).

    Raises:
        ValueError: an active forward without ``targets`` or ``classifier``, or inputs of the wrong shape.
    """

    #: Tells the backbone to call this layer as ``layer(x, targets, classifier)``.
    needs_targets = True

    def __init__(self, active_in_eval: bool = False, track_stats: bool = True) -> None:
        super().__init__(active_in_eval, track_stats)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(
        self, x: Tensor, targets: Tensor | None = None, classifier: Callable[[Tensor], Tensor] | None = None
    ) -> Tensor:
        if not self._drops():
            return x
        if targets is None or classifier is None:
            raise ValueError(
                f"ProbGuidedMaxout is active ({'training' if self.training else 'eval with active_in_eval=True'}) "
                f"but got targets={'None' if targets is None else 'given'} and "
                f"classifier={'None' if classifier is None else 'given'}: it must sit in a backbone's `head` slot "
                "and be called as backbone(x, targets), which ClassificationModule does in training_step"
            )
        _check_descriptor(x, targets)  # before the classifier sees x
        with torch.no_grad():
            logits = classifier(x.detach())
        _check_logits(x, logits)
        keep_fraction = prob_guided_keep_fraction(logits, targets)
        keep = _keep_mask(x, keep_fraction)
        if self.training and self.track_stats:
            kept = torch.round(keep_fraction * x.shape[1]).to(torch.int64).sum()
            self._record(x.numel() - kept, x.numel())
        return _apply(x, keep, keep_fraction, self.scale)

    def extra_repr(self) -> str:
        return "active_in_eval=True" if self.active_in_eval else ""
