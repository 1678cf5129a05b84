"""TopKDropout: drop a set *fraction* of the most active units, exactly.

In training, for each scope (see :data:`~maxdrop.layers.max_dropout.SCOPES`) with ``n``
elements and ``k = round(rate * n)`` (Python's round)::

    t = kthvalue(x_scope, n - k)          # the (n - k)-th smallest value of the scope
    y = where(x > t, 0, x)                # k elements dropped when the values are distinct

Ties at ``t`` are kept, so at most ``k`` elements are dropped. ``k = 0`` is the identity,
``k = n`` drops every element. NaN orders as larger than every number (as in ``torch.sort``)
and is never dropped unless ``k = n``.

Selection. ``sample`` and ``channel`` on the CPU: a row of at least ``_BRACKET_ROW`` elements is
bracketed like the flat scopes below, row by row with NumPy (two pivots from a sorted 2 K-element
subsample, one pass counting ``#(x <= lo)``, one marking ``lo < x <= hi``, a partition of the ~6 %
marked), a miss falling back to sorting that row; shorter rows are copied block by block (about
1 MB) into a buffer and sorted there by NumPy (its vectorized sort is 20-50x faster than
``torch.sort``). ``torch.kthvalue`` on other devices. ``tensor`` and ``global``: two pivots from a
subsample bracket the threshold; one cache-blocked pass counts exactly how many elements lie at or
below each; ``t`` is picked among the few elements inside the bracket. A bracket that misses (an
unlucky subsample, heavy ties) is widened, so the result is always exact, only sometimes slower.
Under DDP the pivot counts are all-reduced and the in-bracket candidates all-gathered, so every
rank uses the threshold one process would compute on the concatenated batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from maxdrop.layers.base import MaskDropLayer, check_fraction, check_scope, zero_where
from maxdrop.utils.threads import one_cpu_thread as _one_cpu_thread  # the name _mask uses

__all__ = ["TopKDropout", "top_k_dropout", "top_k_dropout_mask"]

# Pivots, in standard deviations of the subsample rank around the expected threshold.
_Z_FLAT = torch.tensor([-3.0, 3.0], dtype=torch.float64)
_SUB_FLAT = 1 << 15  # subsample size
_RUN = 16  # the subsample takes runs of this many consecutive elements
# Elements per block of the counting and gathering passes: a 1 MB scratch buffer stays in cache and
# is reused from the heap, where a fresh tensor of the input's size would pay a page fault per 4 KB.
_BLOCK = 1 << 18
_FLAT_ROW = 1 << 14  # flat scopes are cut into rows of this length for blocking
# Per-row select (sample / channel scopes on the CPU): rows this long are bracketed, shorter ones sorted.
_BRACKET_ROW = 1 << 14
_SUB_ROW = 1 << 11  # per-row subsample size: the bracket holds about 6 sd = 6 % of the row at q = 0.7
_Z_ROW = 3.0  # pivots, in standard deviations of the subsample rank


def _scope_rows(x: Tensor, start_dim: int) -> Tensor:
    """``x`` as (A, B, L): one row per scope (dims ``start_dim..`` flattened), a view when the
    memory allows it (e.g. channels_last); the order inside a row is irrelevant to the rule."""
    tail = sorted(range(start_dim, x.ndim), key=lambda d: -x.stride(d))  # stable: ties keep order
    v = x.permute(*range(start_dim), *tail).flatten(start_dim) if start_dim < x.ndim else x[..., None]
    if start_dim < 2:
        return v.reshape(1, 1, -1) if start_dim == 0 else v.unsqueeze(1)
    return v.reshape(*x.shape[:2], v.shape[-1])  # start_dim == 2 (a view: dims 0, 1 untouched)


def _count_le(v: Tensor, piv: Tensor) -> Tensor:
    """Exact ``#(v <= piv[..., j])`` per row: v (A, B, L), piv (A, B, P) -> float64 (A, B, P).

    Block by block of rows (the block stays in cache across the pivots), each comparison is
    written as 0./1. floats into a scratch buffer and summed: much faster on the CPU than
    summing bools, and float32 sums of 0/1 are exact below 2**24.
    """
    a, b, length = v.shape
    step = max(1, _BLOCK // max(1, b * length))
    acc = torch.float32 if length < (1 << 24) else torch.float64
    buf = torch.empty(min(step, a) * b * length, dtype=acc, device=v.device)
    out = torch.empty(piv.shape, dtype=torch.float64, device=v.device)
    for i in range(0, a, step):
        vb, pb = v[i : i + step], piv[i : i + step]
        cmp = buf[: vb.numel()].view(vb.shape)
        for j in range(piv.shape[-1]):
            out[i : i + step, :, j] = torch.le(vb, pb[..., j : j + 1], out=cmp).sum(-1)
    return out


def _gather(v: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """The elements with ``lo < v <= hi``, row after row: v (A, B, L), lo and hi (A, B, 1)."""
    a, b, length = v.shape
    step = max(1, _BLOCK // max(1, b * length))
    parts = []
    for i in range(0, a, step):
        vb, lb, hb = v[i : i + step], lo[i : i + step], hi[i : i + step]
        parts.append(vb[(vb > lb) & (vb <= hb)])
    return torch.cat(parts)


def _pivots(v: Tensor, q: float, size: int, z: Tensor) -> Tensor:
    """Sorted pivot values (A, B, P) at ``z`` standard deviations around the ``q`` quantile of each
    row's subsample of about ``size`` elements (NaN replaced by +inf: it sorts last)."""
    length = v.shape[-1]
    runs = length // _RUN
    if size < length and runs >= 2:  # runs of consecutive elements: far fewer cache lines than a stride
        sub = v[..., : runs * _RUN].unflatten(-1, (runs, _RUN))[..., :: runs * _RUN // size, :]
        sub = _sorted_copy(sub.flatten(-2))
    else:
        sub = _sorted_copy(v[..., :: max(1, length // size)])
    s = sub.shape[-1]
    sd = math.sqrt(max(s * q * (1 - q), 1.0))
    idx = (q * s - 0.5 + z * sd).round().clamp(0, s - 1).long().to(v.device)
    return sub[..., idx].nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf).to(v.dtype)


def _bracket(piv: Tensor, counts: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(hit, lo, hi, c_lo, c_hi), each (..., 1): where two pivots enclose rank ``r``,
    lo < t <= hi with c_lo = #(x <= lo) < r <= c_hi = #(x <= hi); elsewhere ``hit`` is False."""
    below = (counts < r).sum(-1, keepdim=True)  # pivots below the threshold
    p = piv.shape[-1]
    hit = (below > 0) & (below < p)
    i_hi, i_lo = below.clamp(max=p - 1), (below - 1).clamp(min=0)
    return hit, piv.gather(-1, i_lo), piv.gather(-1, i_hi), counts.gather(-1, i_lo), counts.gather(-1, i_hi)


def _single_value(lo: Tensor, hi: Tensor) -> Tensor:
    """Whether ``hi`` is the only value of the dtype in (lo, hi]: then t = hi, no gathering."""
    return torch.nextafter(lo, hi) == hi


def _numpy_sorts(t: Tensor) -> bool:
    """Whether to sort with NumPy: on the CPU its vectorized sort is 20-50x faster than ``torch.sort``."""
    return t.device.type == "cpu"


def _sorted_copy(v: Tensor) -> Tensor:
    """``v`` sorted along the last dim (NaN last, as in ``torch.sort``), float32 (float64 for float64)."""
    out = torch.empty(v.shape, dtype=torch.float64 if v.dtype == torch.float64 else torch.float32, device=v.device)
    out.copy_(v)  # exact for float16 / bfloat16, and contiguous for NumPy
    if _numpy_sorts(v):
        out.numpy().sort(axis=-1)
        return out
    return out.sort(-1).values


def _row_thresholds(v: Tensor, r: int) -> Tensor:
    """Per-row ``kthvalue(row, r)`` of v (A, B, L) -> (A, B), exactly; 1 <= r <= L.

    On the CPU, rows of at least ``_BRACKET_ROW`` elements are selected one by one with
    :func:`_bracket_select`; shorter ones are copied block by block into a cache-sized buffer and
    sorted there by NumPy. Elsewhere ``torch.kthvalue`` is fast enough.
    """
    if not _numpy_sorts(v):
        return v.kthvalue(r, dim=-1).values
    a, b, length = v.shape
    t = torch.empty((a, b), dtype=v.dtype)
    if length >= _BRACKET_ROW:
        wide = torch.float64 if v.dtype == torch.float64 else torch.float32
        dense = v.dtype == wide and v.stride(-1) == 1
        buf = None if dense else torch.empty(length, dtype=wide)  # rows not dense in a wide dtype
        le, inside = np.empty(length, dtype=bool), np.empty(length, dtype=bool)
        for i in range(a):
            for j in range(b):
                values = (v[i, j] if buf is None else buf.copy_(v[i, j])).numpy()
                t[i, j] = float(_bracket_select(values, r, le, inside))  # reads the row: no copy when dense
        return t
    step = max(1, _BLOCK // max(1, b * length))
    for i in range(0, a, step):
        t[i : i + step] = _sorted_copy(v[i : i + step])[..., r - 1]
    return t


def _bracket_select(row: np.ndarray, r: int, le: np.ndarray, inside: np.ndarray) -> float:
    """The r-th smallest of a 1-dim float array (NaN last), exactly, without sorting all of it.

    Two pivots from a sorted subsample of runs bracket the rank: one pass counts
    ``c = #(row <= lo)``, a second marks ``lo < row <= hi``; when ``c < r <= c + #inside`` the
    answer is the (r - c)-th smallest of the few marked elements (NaN never lies inside).
    A bracket that misses falls back to sorting the row: always exact, only sometimes slower.
    ``le`` and ``inside`` are bool scratch arrays of the row's length.
    """
    length = row.shape[0]
    runs = length // _RUN
    sub = np.sort(row[: runs * _RUN].reshape(runs, _RUN)[:: max(1, runs * _RUN // _SUB_ROW)], axis=None)
    s, q = sub.shape[0], r / length
    sd = math.sqrt(max(s * q * (1 - q), 1.0))
    lo, hi = (sub[min(max(round(q * s - 0.5 + z * sd), 0), s - 1)] for z in (-_Z_ROW, _Z_ROW))
    lo, hi = (math.inf if math.isnan(p) else p for p in (lo, hi))  # NaN sorts last, like +inf here
    c = np.count_nonzero(np.less_equal(row, lo, out=le))
    if c >= r:  # at or below lo: lo itself when enough elements tie there (e.g. a post-ReLU 0)
        if np.count_nonzero(np.less(row, lo, out=inside)) < r:
            return lo
        return np.sort(row)[r - 1]
    np.less_equal(row, hi, out=inside)
    cand = row[np.logical_xor(inside, le, out=inside)]  # lo < row <= hi: le implies row <= hi
    j = r - c - 1
    if j >= cand.shape[0]:  # above hi (or among the NaNs)
        return np.sort(row)[r - 1]
    return np.partition(cand, j)[j]


def _flat_rows(x: Tensor) -> list[Tensor]:
    """The whole of ``x`` as (A, 1, L) blocks of at most ``_FLAT_ROW`` elements (views if dense)."""
    f = _scope_rows(x, 0).reshape(-1)  # a view whenever x is dense
    full = f.numel() // _FLAT_ROW * _FLAT_ROW
    parts = [f[:full].view(-1, 1, _FLAT_ROW)] if full else []
    return parts + ([f[full:].view(1, 1, -1)] if full < f.numel() else [])


def _all_reduce(t: Tensor) -> Tensor:
    dist.all_reduce(t)
    return t


def _all_gather_ragged(t: Tensor) -> Tensor:
    """Concatenation of every rank's 1-dim ``t`` (of varying length), in rank order."""
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.numel()], device=t.device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.cat([t, t.new_zeros(max(sizes) - t.numel())])
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])


def _flat_threshold(x: Tensor, r: int, n: int, distributed: bool) -> Tensor:
    """``kthvalue(r)`` of all of ``x`` (of every rank's ``x`` when ``distributed``), 1 <= r < n."""
    parts = _flat_rows(x)
    whole = _scope_rows(x, 0).reshape(1, 1, -1)
    piv = _pivots(whole, r / n, _SUB_FLAT, _Z_FLAT).reshape(-1)
    if distributed:  # every rank must count against the same pivots: a mean of sorted vectors is sorted
        piv = (_all_reduce(piv.double()) / dist.get_world_size()).to(x.dtype)

    def counts_at(piv: Tensor) -> Tensor:
        c = sum(_count_le(p, piv.expand(p.shape[0], 1, -1)).sum((0, 1)) for p in parts)
        return _all_reduce(c) if distributed else c

    counts = counts_at(piv)
    hit, lo, hi, c_lo, _ = (u.reshape(()) for u in _bracket(piv, counts, r))
    if not hit:  # widen to everything below the lowest / above the highest pivot (rare, exact)
        low = bool(counts[0] >= r)
        inf = torch.full((1,), math.inf, dtype=x.dtype, device=x.device)
        below = torch.nextafter(piv[:1], -inf)  # catches a threshold equal to the lowest pivot
        piv = torch.cat([-inf, below, piv[:1]]) if low else torch.cat([piv[-1:], inf])
        counts = counts_at(piv)
        if low and counts[0] >= r:
            return -inf[0]
        if not low and counts[1] < r:  # rank r falls among the NaNs (they sort last)
            return torch.full((), math.nan, dtype=x.dtype, device=x.device)
        _, lo, hi, c_lo, _ = (u.reshape(()) for u in _bracket(piv, counts, r))
    if _single_value(lo, hi):
        return hi
    cand = torch.cat([_gather(p, lo.expand(p.shape[0], 1, 1), hi.expand(p.shape[0], 1, 1)) for p in parts])
    if distributed:
        cand = _all_gather_ragged(cand)
    return cand.kthvalue(r - int(c_lo.item())).values


@torch.compiler.disable  # data-dependent selection: runs eagerly inside a compiled model
def _mask(x: Tensor, rate: float, scope: str) -> Tensor:
    """:func:`top_k_dropout_mask` for an already validated ``rate`` and ``scope``."""
    with torch.no_grad(), _one_cpu_thread(x.device.type == "cpu"):
        xd = x.detach()
        if scope in ("tensor", "global"):
            distributed = scope == "global" and dist.is_available() and dist.is_initialized()
            n = xd.numel()
            if distributed:
                n = int(_all_reduce(torch.tensor([n], device=x.device)).item())
            k, start_dim = round(rate * n), 0
        else:
            start_dim = 1 if scope == "sample" else 2
            n = math.prod(x.shape[start_dim:])
            k = round(rate * n)
        if k == 0 or k == n or x.numel() == 0:
            return torch.full_like(xd, k == n and n > 0, dtype=torch.bool)
        if start_dim == 0:
            t = _flat_threshold(xd, n - k, n, distributed)
        else:
            t = _row_thresholds(_scope_rows(xd, start_dim), n - k)
            t = t.view(*t.shape[:start_dim], *(1,) * (x.ndim - start_dim))
    with torch.no_grad():
        return xd > t  # one large op: every thread, like the layer's output


def _rescale(x: Tensor, mask: Tensor, scope: str) -> Tensor:
    """``x`` with dropped elements zeroed and kept ones times n / (n - dropped), per scope."""
    dims = None if scope in ("tensor", "global") else tuple(range(1 if scope == "sample" else 2, x.ndim))
    dropped = torch.count_nonzero(mask) if dims is None else torch.count_nonzero(mask, dim=dims)
    n = torch.tensor(mask.numel() if dims is None else math.prod(x.shape[i] for i in dims), device=x.device)
    if scope == "global" and dist.is_available() and dist.is_initialized():
        dropped, n = _all_reduce(torch.stack([dropped, n])).unbind()
    scale = (n / (n - dropped).clamp(min=1).double()).to(x.dtype)
    if dims is not None:
        scale = scale.view(*scale.shape, *(1,) * len(dims))
    return x * torch.where(mask, torch.zeros((), dtype=x.dtype, device=x.device), scale)


def top_k_dropout_mask(x: Tensor, rate: float = 0.3, scope: str = "sample") -> Tensor:
    """Boolean mask of the elements TopKDropout drops (True = dropped).

    Args:
        x: input of shape (N, ...); for ``scope="channel"`` (N, C, ...).
        rate: fraction of each scope's elements to drop, in [0, 1] (``k = round(rate * n)``).
        scope: one of :data:`~maxdrop.layers.max_dropout.SCOPES`.

    Returns:
        Tensor of shape ``x.shape`` and dtype ``torch.bool``.
    """
    rate = check_fraction(rate, "rate")
    check_scope(scope, x.ndim)
    return _mask(x, rate, scope)


def top_k_dropout(
    x: Tensor, rate: float = 0.3, scope: str = "sample", training: bool = True, rescale: bool = False
) -> Tensor:
    """Functional TopKDropout: zero the ``round(rate * n)`` largest elements of each scope.

    Args:
        x: input of shape (N, ...) (e.g. (N, F) or (N, C, H, W)), any float dtype.
        rate: fraction in [0, 1]. ``rate=0`` returns ``x`` itself.
        scope: ``"tensor"``, ``"sample"``, ``"channel"`` or ``"global"``.
        training: when False, returns ``x`` unchanged.
        rescale: multiply the kept elements by n / (n - dropped) per scope.

    Returns:
        Tensor of the same shape and dtype as ``x``; the gradient is zero on dropped elements
        and passes (times the rescale factor) elsewhere.
    """
    rate = check_fraction(rate, "rate")
    check_scope(scope, x.ndim)
    if not training or rate == 0.0:
        return x
    mask = _mask(x, rate, scope)
    return _rescale(x, mask, scope) if rescale else zero_where(x, mask)


class TopKDropout(MaskDropLayer):
    """Drops the ``round(rate * n)`` most active of the ``n`` units of each scope.

    Where :class:`~maxdrop.layers.max_dropout.MaxDropout`'s ``p`` is a fraction of the
    min-max *range* (and so may drop almost nothing), ``rate`` here is the fraction of
    *units* dropped. Ties at the threshold are kept (at most ``k`` dropped).

    Args:
        rate: fraction of each scope's units to drop, in [0, 1].
        scope: ``"sample"`` (default), ``"channel"``, ``"tensor"`` or ``"global"`` (the
            whole batch across DDP ranks: exactly one process's choice on the full batch).
        active_in_eval: keep dropping in eval mode.
        track_stats: record drop counts (``last_dropped``, ``dropped_total``, ...).
        rescale: multiply kept units by n / (n - dropped) per scope (as ``nn.Dropout`` keeps
            the expectation); off by default, as in MaxDropout.

    Shape:
        Input (N, ...) ((N, C, ...) for ``scope="channel"``); output: same shape.
    """

    fraction_name = "rate"

    def __init__(
        self,
        rate: float = 0.3,
        scope: str = "sample",
        active_in_eval: bool = False,
        track_stats: bool = True,
        rescale: bool = False,
    ) -> None:
        super().__init__(active_in_eval, track_stats)
        self.rate = check_fraction(rate, "rate")
        self.scope = check_scope(scope)
        self.rescale = bool(rescale)

    def drop_mask(self, x: Tensor) -> Tensor:
        check_scope(self.scope, x.ndim)
        return _mask(x, self.rate, self.scope)

    def apply_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        return _rescale(x, mask, self.scope) if self.rescale else zero_where(x, mask)

    def extra_repr(self) -> str:
        s = f"rate={self.rate}, scope={self.scope!r}"
        return s + (", rescale=True" if self.rescale else "") + self._eval_repr()
