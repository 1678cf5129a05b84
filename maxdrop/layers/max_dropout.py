"""MaxDropout and MaxDropoutV2: drop the most active units instead of random ones.

MaxDropout (Santos et al., ICPR 2020, arXiv:2007.13723), in training::

    z = (x - min(x)) / (max(x) - min(x))      # min and max over the scope
    y = where(z > 1 - p, 0, x)                  # no 1 / (1 - p) rescaling

The min-max normalized value of an element is a monotone function of the element,
so the set of dropped elements is ``x > x_star`` for a single per-scope threshold
``x_star``. This module computes that threshold *exactly*, i.e. the mask equals the
one the authors' code computes in the input's dtype element for element, from the
scope's min and max alone. The per-element work is then one comparison and one
``masked_fill``: no normalized copy of the tensor is ever materialized.

Non-finite input: if a scope contains NaN or +/-inf, nothing in that scope is dropped
(the authors' code behaves the same way: its normalized tensor becomes NaN there and
``NaN > t`` is false). So no NaN is ever created where the input had none.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from maxdrop.layers.base import SCOPES, MaskDropLayer, check_fraction, check_scope

__all__ = [
    "SCOPES",
    "MaxDropout",
    "MaxDropoutV2",
    "max_dropout",
    "max_dropout_mask",
    "max_dropout_v2",
    "max_dropout_v2_mask",
]


def _minmax(x: Tensor, start_dim: int) -> tuple[Tensor, Tensor]:
    """Min and max over dims ``start_dim..`` with the reduced dims kept (size 1)."""
    if start_dim == 0:
        mn, mx = torch.aminmax(x)
        shape = (1,) * x.ndim
        return mn.reshape(shape), mx.reshape(shape)
    shape = x.shape[:start_dim] + (1,) * (x.ndim - start_dim)
    if x.is_contiguous():  # one fused pass over a free view
        mn, mx = torch.aminmax(x.flatten(start_dim), dim=-1)
        return mn.reshape(shape), mx.reshape(shape)
    dims = tuple(range(start_dim, x.ndim))  # e.g. channels_last: no copy, two passes
    return torch.amin(x, dim=dims, keepdim=True), torch.amax(x, dim=dims, keepdim=True)


def _largest_below(bound: Tensor, inclusive: Tensor, dtype: torch.dtype) -> Tensor:
    """Largest value of ``dtype`` that is < ``bound`` (or <= where ``inclusive``)."""
    c = bound.to(dtype)  # the nearest representable value
    cd = c.to(torch.float64)
    too_big = (cd > bound) | ((cd == bound) & ~inclusive)
    return torch.where(too_big, torch.nextafter(c, torch.full_like(c, -float("inf"))), c)


def _round_down_bound(v: Tensor) -> tuple[Tensor, Tensor]:
    """For a value ``v`` of a float dtype: (B, even) such that, for a real q >= 0,
    round_to_nearest_even(q) <= v  <=>  q < B, or q == B and ``even``."""
    up = torch.nextafter(v, torch.full_like(v, float("inf")))
    vd = v.to(torch.float64)
    half_ulp = (up.to(torch.float64) - vd) * 0.5
    # A tie at v + ulp/2 rounds to v when v's last significand bit is even, i.e. when
    # v + ulp/2 rounded to the precision of v lands on v.
    even = (vd + half_ulp).to(v.dtype) == v
    return vd + half_ulp, even


def _normalized(x: Tensor, mn: Tensor, d: Tensor) -> Tensor:
    # The authors' formula, op for op, in the input's dtype.
    return (x - mn) / d


def _threshold(mn: Tensor, mx: Tensor, p: float) -> Tensor:
    """Per-scope ``x_star`` with ``(x - mn) / (mx - mn) > 1 - p  <=>  x > x_star``.

    Shapes of ``mn`` and ``mx``: anything broadcastable against the input.
    The bound arithmetic runs in float64, where the products and sums involved are exact
    for float32/16/bf16 operands; a final check with the authors' own ops corrects the
    last ulp wherever the device's rounding (e.g. half computed through float) differs.
    """
    dtype = mn.dtype
    t = torch.tensor(1.0 - p, dtype=dtype, device=mn.device)  # as `x > (1 - p)` casts it
    d = mx - mn
    # fl(u / d) <= t  <=>  u < d * Tq (or ==, tie to even)
    t_bound, t_even = _round_down_bound(t)
    u_star = _largest_below(d.to(torch.float64) * t_bound, t_even, dtype)
    # fl(x - mn) <= u_star  <=>  x < mn + Ub (or ==)
    u_bound, u_even = _round_down_bound(u_star)
    x_star = _largest_below(mn.to(torch.float64) + u_bound, u_even, dtype)
    # Verify against the authors' ops on x_star and its upper neighbour (monotone).
    inf = torch.full_like(x_star, float("inf"))
    x_up = torch.nextafter(x_star, inf)
    x_down = torch.nextafter(x_star, -inf)
    x_star = torch.where(
        _normalized(x_up, mn, d) <= t,
        x_up,
        torch.where(_normalized(x_star, mn, d) <= t, x_star, x_down),
    )
    # Constant scope (d == 0) or non-finite values: nothing is dropped.
    valid = (d > 0) & torch.isfinite(d)
    return torch.where(valid, x_star, inf)


def max_dropout_mask(x: Tensor, p: float = 0.3, scope: str = "tensor") -> Tensor:
    """Boolean mask of the elements that MaxDropout drops (True = dropped).

    Args:
        x: input of shape (N, ...); for ``scope="channel"`` (N, C, ...).
        p: drop rate in [0, 1]: elements whose min-max normalized value is > 1 - p.
        scope: one of :data:`SCOPES`.

    Returns:
        Tensor of shape ``x.shape`` and dtype ``torch.bool``.
    """
    p = check_fraction(p, "p")
    check_scope(scope, x.ndim)
    return _mask(x, p, scope)


def _mask(x: Tensor, p: float, scope: str) -> Tensor:
    """:func:`max_dropout_mask` for an already validated ``p`` and ``scope`` (the modules' hot path)."""
    if x.numel() == 0 or p == 0.0:
        return torch.zeros_like(x, dtype=torch.bool)
    start_dim = {"tensor": 0, "global": 0, "sample": 1, "channel": 2}[scope]
    with torch.no_grad():
        mn, mx = _minmax(x.detach(), start_dim)
        if scope == "global" and dist.is_available() and dist.is_initialized():
            # One all-reduce for both: max(-mn) = -min(mn).
            both = torch.stack([-mn.reshape(()), mx.reshape(())])
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            mn, mx = (-both[0]).reshape(mn.shape), both[1].reshape(mx.shape)
        return x.detach() > _threshold(mn, mx, p)


def max_dropout(x: Tensor, p: float = 0.3, scope: str = "tensor", training: bool = True) -> Tensor:
    """Functional MaxDropout: zero the elements whose min-max normalized value is > 1 - p.

    Args:
        x: input of shape (N, ...) (e.g. (N, F) or (N, C, H, W)), any float dtype.
        p: drop rate in [0, 1]. ``p=0`` returns ``x`` itself.
        scope: over which elements min and max are taken, see :data:`SCOPES`.
        training: when False, returns ``x`` unchanged.

    Returns:
        Tensor of the same shape and dtype as ``x``. Kept elements are not rescaled;
        the gradient is zero on dropped elements and passes unchanged elsewhere.
    """
    p = check_fraction(p, "p")
    check_scope(scope, x.ndim)
    if not training or p == 0.0:
        return x
    return x.masked_fill(_mask(x, p, scope), 0)


def _check_v2_input(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"MaxDropoutV2 expects an (N, C, H, W) input, got shape {tuple(x.shape)}")


def max_dropout_v2_mask(x: Tensor, p: float = 0.3) -> Tensor:
    """Mask of MaxDropoutV2 of shape (N, 1, H, W) (True = spatial position dropped)."""
    p = check_fraction(p, "p")
    _check_v2_input(x)
    return _v2_mask(x, p)


def _v2_mask(x: Tensor, p: float) -> Tensor:
    """:func:`max_dropout_v2_mask` for an already validated ``p`` and a 4-dim ``x``."""
    if x.numel() == 0 or p == 0.0:
        return torch.zeros((x.shape[0], 1, *x.shape[2:]), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        summed = x.detach().sum(dim=1, keepdim=True)  # (N, 1, H, W)
        mn, mx = _minmax(summed, 1)
        return summed > _threshold(mn, mx, p)


def max_dropout_v2(x: Tensor, p: float = 0.3, training: bool = True) -> Tensor:
    """Functional MaxDropoutV2 (arXiv:2203.02740) for (N, C, H, W) inputs.

    The feature maps are summed over the channel axis into one (N, 1, H, W) map, which is
    min-max normalized per sample; the spatial positions whose normalized value is > 1 - p
    are zeroed in every channel. Like MaxDropout, kept values are not rescaled.
    """
    p = check_fraction(p, "p")
    _check_v2_input(x)
    if not training or p == 0.0:
        return x
    return x.masked_fill(_v2_mask(x, p), 0)


class MaxDropout(MaskDropLayer):
    """Drops the most active units (Santos et al., 2020).

    In training, the input is min-max normalized over ``scope`` and every element whose
    normalized value is above ``1 - p`` is set to zero; the others pass unchanged (no
    rescaling). In eval it is the identity, unless ``active_in_eval=True``.

    Args:
        p: drop rate in [0, 1] (paper default 0.3). ``p=0`` is an exact identity.
        scope: ``"tensor"`` (the authors' code: min/max over the whole batch),
            ``"sample"``, ``"channel"`` or ``"global"`` (whole batch across DDP ranks).
        active_in_eval: keep dropping in eval mode. The authors build a fresh MaxDropout
            inside ``forward()``, so ``model.eval()`` never switched it off and the paper's
            test errors were measured with it active; set this to reproduce that protocol.
        track_stats: record drop counts (see :class:`~maxdrop.layers.base.DropStats`); costs one reduction of
            the boolean mask per forward.

    Shape:
        Input (N, ...) ((N, C, ...) for ``scope="channel"``); output: same shape.
    """

    def __init__(
        self,
        p: float = 0.3,
        scope: str = "tensor",
        active_in_eval: bool = False,
        track_stats: bool = True,
    ) -> None:
        super().__init__(active_in_eval, track_stats)
        self.p = check_fraction(p, "p")
        self.scope = check_scope(scope)

    def drop_mask(self, x: Tensor) -> Tensor:
        check_scope(self.scope, x.ndim)
        return _mask(x, self.p, self.scope)

    def extra_repr(self) -> str:
        return f"p={self.p}, scope={self.scope!r}" + self._eval_repr()


class MaxDropoutV2(MaskDropLayer):
    """MaxDropoutV2 (Santos et al., arXiv:2203.02740) for (N, C, H, W) feature maps.

    Implemented: the input is summed over the channel axis into one (N, 1, H, W) map;
    the map is min-max normalized per sample; the positions whose normalized value is
    above ``1 - p`` are zeroed in all channels; kept values are not rescaled. This follows
    the paper's description of V2 (channel sum, normalization, threshold at 1 - p, one
    spatial mask shared by the channels); per-sample normalization is this implementation's
    choice so that the result does not depend on the rest of the batch.

    Args:
        p: drop rate in [0, 1].
        active_in_eval: keep dropping in eval mode (see :class:`MaxDropout`).
        track_stats: record drop counts; ``last_dropped`` counts elements (positions x C).
    """

    def __init__(self, p: float = 0.3, active_in_eval: bool = False, track_stats: bool = True) -> None:
        super().__init__(active_in_eval, track_stats)
        self.p = check_fraction(p, "p")

    def drop_mask(self, x: Tensor) -> Tensor:
        """(N, 1, H, W): one spatial mask per sample, shared by the channels."""
        _check_v2_input(x)
        return _v2_mask(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}" + self._eval_repr()
