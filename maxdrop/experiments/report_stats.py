"""Statistics of `maxdrop report`: differences between two configs' seeds, their confidence intervals,
t-test p-values and the Holm–Bonferroni correction over the rows of a table.

A difference is ``other - reference`` (for test error: positive = worse than the reference). Paired
comparisons use the seeds both configs ran (the seed fixes the initialization, the data order and the
augmentation, so two configs' runs of one seed form a pair); Welch's comparison uses all runs of each.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["TESTS", "Comparison", "compare", "holm"]

#: Significance tests: name -> how a table header names it.
TESTS = {"paired": "paired t-test by seed", "welch": "Welch t-test"}


@dataclass(frozen=True)
class Comparison:
    """One config against its reference.

    Attributes:
        n: seeds in the comparison (pairs for ``paired``; the smaller group for ``welch``).
        diff: mean difference ``other - reference``.
        low, high: its 95 % confidence interval (t distribution).
        p: the two-sided t-test p-value, uncorrected.
        p_holm: ``p`` after the Holm–Bonferroni correction over a table's comparisons (set by :func:`holm`).
    """

    n: int
    diff: float
    low: float
    high: float
    p: float
    p_holm: float | None = None


def compare(reference: Mapping[Any, float], other: Mapping[Any, float], test: str) -> Comparison | None:
    """``other`` against ``reference`` (seed -> value each); None where there are too few values
    (fewer than 2 common seeds for ``paired``, fewer than 2 values on a side for ``welch``)."""
    from scipy import stats

    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; allowed: {', '.join(map(repr, TESTS))}")
    if test == "paired":
        seeds = [s for s in other if s in reference]
        if len(seeds) < 2:
            return None
        a, b = [other[s] for s in seeds], [reference[s] for s in seeds]
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        if _nearly_constant(diffs):  # the t statistic is undefined (or all rounding noise)
            return _constant(len(seeds), sum(diffs) / len(diffs), [*a, *b])
        with _one_side_may_be_constant():
            result = stats.ttest_rel(a, b)
    else:
        a, b = list(other.values()), list(reference.values())
        if len(a) < 2 or len(b) < 2:
            return None
        if _nearly_constant(a) and _nearly_constant(b):
            return _constant(min(len(a), len(b)), sum(a) / len(a) - sum(b) / len(b), [*a, *b])
        with _one_side_may_be_constant():
            result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(0.95)
    diff = sum(a) / len(a) - sum(b) / len(b)
    return Comparison(min(len(a), len(b)), diff, float(ci.low), float(ci.high), float(result.pvalue))


def _rounding(values: Sequence[float]) -> float:
    return 1e-12 * max(1.0, max(abs(v) for v in values))


def _nearly_constant(values: Sequence[float]) -> bool:
    """All values equal up to float rounding (seeds that gave the same error, or a difference of two
    such): their spread is noise of the last bits, not a variance a t-test can use."""
    return max(values) - min(values) <= _rounding(values)


def _constant(n: int, diff: float, values: Sequence[float]) -> Comparison:
    """A difference without spread: certain (p = 0) unless it is itself rounding noise (p = 1)."""
    if abs(diff) <= _rounding(values):
        return Comparison(n, 0.0, 0.0, 0.0, 1.0)
    return Comparison(n, diff, diff, diff, 0.0)


@contextlib.contextmanager
def _one_side_may_be_constant():
    # scipy warns of "catastrophic cancellation" when one side's values are all equal (its variance
    # is then exactly 0, which Welch's and the paired test handle); the both-constant case is above.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        yield


def holm(comparisons: Sequence[Comparison | None]) -> list[Comparison | None]:
    """The comparisons with ``p_holm`` set: Holm's step-down adjustment over the ones that are not None.

    The i-th smallest of m p-values becomes ``max over j <= i of min(1, (m - j + 1) p_(j))``; rejecting
    where ``p_holm < alpha`` keeps the family-wise error rate at alpha over all m comparisons.
    """
    present = sorted((c.p, i) for i, c in enumerate(comparisons) if c is not None and not math.isnan(c.p))
    m, running = len(present), 0.0
    adjusted: dict[int, float] = {}
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return [
        None if c is None else Comparison(c.n, c.diff, c.low, c.high, c.p, adjusted.get(i, math.nan))
        for i, c in enumerate(comparisons)
    ]
