"""Figures of `maxdrop report`, drawn to be read at a glance.

Every figure gives a config the same colour (:func:`colours`: fixed by the sorted config names, so a
config keeps its colour across the figures of one report and across reports over the same rows),
splits what would be many lines on one axis into small multiples (one panel per config, per slot or
per measure), and keeps legends outside the data.

- ``val_error.png``: one panel per config, its validation error per epoch (mean over seeds, band =
  min..max), with the baseline's mean in grey in every panel.
- ``dropped_fraction.png``: one panel per dropout slot, one line per config that fills it.
- ``measures.png``: one panel per measure (test error, ECE, NLL, train-test gap), every seed as a dot
  and the mean as a bar, one row per config.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["colours", "plot"]


def colours(names: Sequence[str]) -> dict[str, Any]:
    """config name -> colour: sorted names on tab10 (up to 10 configs), tab20 (up to 20: its 10 dark
    shades first, then the light ones, so that neighbours in the sorted order differ in hue), else turbo."""
    import matplotlib

    ordered = sorted(set(names))
    n = len(ordered)
    if n <= 10:
        cmap, at = matplotlib.colormaps["tab10"], lambda i: i
    elif n <= 20:
        cmap, at = matplotlib.colormaps["tab20"], lambda i: 2 * i if i < 10 else 2 * (i - 10) + 1
    else:
        cmap, at = matplotlib.colormaps["turbo"], lambda i: 0.05 + 0.9 * i / (n - 1)
    return {name: cmap(at(i)) for i, name in enumerate(ordered)}


def _aligned(curves: list[dict[int, float]]):
    """The epochs every curve has, and the (curves, epochs) array of their values there."""
    import numpy as np

    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return epochs, np.array([[c[e] for e in epochs] for c in curves])


def _panels(n: int, ncols: int, width: float = 3.2, height: float = 2.4, **kw):
    import matplotlib.pyplot as plt

    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained", **kw
    )
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def plot_val_error(groups: dict[str, list], colour: dict[str, Any], baseline: str | None, out: Path) -> Path | None:
    curves = {}
    for name, runs in groups.items():
        per_run = [dict(r.epochs) for r in runs if r.epochs]
        if per_run:
            curves[name] = _aligned(per_run)
    if not curves:
        return None
    fig, axes = _panels(len(curves), 4, sharex=True, sharey=True)
    for ax, (name, (epochs, vals)) in zip(axes, sorted(curves.items()), strict=True):
        if baseline in curves and name != baseline:
            b_epochs, b_vals = curves[baseline]
            ax.plot(b_epochs, b_vals.mean(0), color="0.6", lw=1.2, ls="--")
        ax.plot(epochs, vals.mean(0), color=colour[name], marker="o", ms=3)
        ax.fill_between(epochs, vals.min(0), vals.max(0), color=colour[name], alpha=0.25, lw=0)
        ax.set_title(f"{name} (n={len(vals)})", fontsize=9)
        _epoch_axis(ax)
    for i, ax in enumerate(axes):
        if i + 4 >= len(axes):  # no panel below it
            ax.set_xlabel("epoch")
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel("val error (%)")
    title = "Validation error per epoch: mean over seeds, band = min..max"
    if baseline in curves:
        title += f"; grey dashed = {baseline}"
    return _finish(fig, out / "val_error.png", title)


def plot_dropped(groups: dict[str, list], colour: dict[str, Any], out: Path) -> Path | None:
    by_slot: dict[str, dict[str, tuple]] = defaultdict(dict)
    for name, runs in groups.items():
        per_slot: dict[str, list[dict[int, float]]] = defaultdict(list)
        for r in runs:
            for slot, s in r.dropped_fractions().items():
                per_slot[slot].append(dict(s))
        for slot, curves in per_slot.items():
            epochs, vals = _aligned(curves)
            by_slot[slot][name] = (epochs, vals.mean(0))
    if not by_slot:
        return None
    fig, axes = _panels(len(by_slot), 4, sharex=True)
    shown: dict[str, Any] = {}
    for ax, (slot, series) in zip(axes, sorted(by_slot.items()), strict=True):
        for name, (epochs, mean) in sorted(series.items()):
            (shown[name],) = ax.plot(epochs, mean, color=colour[name], marker="o", ms=3, label=name)
        lows, highs = [m.min() for _, m in series.values()], [m.max() for _, m in series.values()]
        if min(lows) > 0 and max(highs) > 10 * min(lows):
            ax.set_yscale("log")  # scopes differ by orders of magnitude
        ax.set_title(slot, fontsize=9)
        ax.set_xlabel("epoch")
        _epoch_axis(ax)
    axes[0].set_ylabel("dropped fraction (training)")
    names = sorted(shown)
    fig.legend([shown[n] for n in names], names, loc="outside right center", fontsize=8)
    return _finish(fig, out / "dropped_fraction.png", "Units each dropout slot shut off in training (mean over seeds)")


def plot_measures(
    groups: dict[str, list],
    colour: dict[str, Any],
    measures: dict[str, Callable[[Any], float | None]],
    baseline: str | None,
    out: Path,
) -> Path | None:
    """One panel per measure; ``measures``: label -> value of a run (None where the run lacks it)."""
    values = {
        label: {name: [v for r in runs if (v := get(r)) is not None] for name, runs in groups.items()}
        for label, get in measures.items()
    }
    values = {label: v for label, v in values.items() if any(v.values())}
    if not values:
        return None
    names = sorted(groups, reverse=True)  # top to bottom in alphabetical order
    fig, axes = _panels(len(values), 4, width=3.0, height=0.35 * len(names) + 1.0, sharey=True)
    for ax, (label, per_config) in zip(axes, values.items(), strict=True):
        if per_config.get(baseline):
            ax.axvline(sum(per_config[baseline]) / len(per_config[baseline]), color="0.6", ls="--", lw=1)
        for y, name in enumerate(names):
            v = per_config.get(name) or []
            if v:
                ax.plot(v, [y] * len(v), "o", color=colour[name], ms=3.5, alpha=0.7)
                ax.plot([sum(v) / len(v)], [y], "|", color=colour[name], ms=14, mew=2.5)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    title = "Test measures per config: dots = seeds, bar = mean"
    if baseline in groups:
        title += f"; grey dashed = mean of {baseline}"
    return _finish(fig, out / "measures.png", title)


def plot(groups: dict[str, list], out: Path, baseline: str | None, measures: dict[str, Callable]) -> list[Path]:
    """Write the report's figures into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    colour = colours(list(groups))
    figures = (
        plot_measures(groups, colour, measures, baseline, out),
        plot_val_error(groups, colour, baseline, out),
        plot_dropped(groups, colour, out),
    )
    return [p for p in figures if p is not None]
