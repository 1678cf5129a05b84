"""`maxdrop report`: tables and plots over many runs, grouped by config.

A *run* is a folder holding the ``config.yaml`` that LightningCLI saved at ``fit`` and the
TensorBoard event files of that fit. Its test results are read from the same folder or from its
``test/`` sub-folder; the test pass with MaxDropout left on in eval (the authors' protocol), when
there is one, from ``test_active_in_eval/``. Runs are grouped by their config with the seed, the
paths and the logger removed, so the seeds of one config form one row.

    maxdrop report lightning_logs/study --baseline no_dropout --out docs/results
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Config keys that never separate two runs into different rows.
IGNORED_KEYS = (
    "seed_everything",
    "ckpt_path",
    "trainer.logger",
    "trainer.default_root_dir",
    "data.init_args.data_dir",
    "data.init_args.cache_dir",
    "data.init_args.num_workers",
    "data.init_args.download",
)
#: Config subtrees a study compares by default: the dropout slots and the augmentation.
DEFAULT_COMPARED = ("model.init_args.backbone.init_args.slots", "data.init_args.augment")
SUB_TEST = "test"
SUB_ACTIVE = "test_active_in_eval"
_DROPPED = re.compile(r"^maxdrop/(.+)/dropped_fraction$")


class ReportError(ValueError):
    """Bad input to the report: the message says what was wrong and what is expected."""


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    scalars: dict[str, list[tuple[int, float, float]]]  # tag -> [(step, value, wall_time)]
    test: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    active: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)

    @property
    def seed(self) -> Any:
        return self.config.get("seed_everything")

    def last(self, tag: str, source: str = "test") -> float | None:
        values = {"test": self.test, "active": self.active, "fit": self.scalars}[source].get(tag)
        return values[-1][1] if values else None

    @property
    def test_error(self) -> float | None:
        return self.last("test/error")

    @property
    def epochs(self) -> list[tuple[int, float]]:
        """(epoch, val/error) pairs, epochs counted from 0."""
        vals = self.scalars.get("val/error", [])
        epoch_at = {step: value for step, value, _ in self.scalars.get("epoch", [])}
        out = []
        for i, (step, value, _) in enumerate(vals):
            out.append((int(epoch_at.get(step, i)), value))
        return out

    @property
    def train_seconds(self) -> float | None:
        times = [w for values in self.scalars.values() for _, _, w in values]
        return max(times) - min(times) if len(times) > 1 else None

    def dropped_fractions(self) -> dict[str, list[tuple[int, float]]]:
        epoch_at = {step: value for step, value, _ in self.scalars.get("epoch", [])}
        out = {}
        for tag, values in self.scalars.items():
            m = _DROPPED.match(tag)
            if m:
                out[m.group(1)] = [(int(epoch_at.get(s, i)), v) for i, (s, v, _) in enumerate(values)]
        return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: d}


def config_key(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config without the keys that vary between seeds of one experiment."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED_KEYS)}


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """All scalars of the event files directly inside ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out[tag].extend((e.step, e.value, e.wall_time) for e in acc.Scalars(tag))
    for values in out.values():
        values.sort(key=lambda e: (e[2], e[0]))
    return dict(out)


def find_runs(roots: list[Path]) -> list[Run]:
    runs = []
    for root in roots:
        if not root.exists():
            raise ReportError(f"run folder {str(root)!r} does not exist")
        for cfg in sorted(root.rglob("config.yaml")):
            folder = cfg.parent
            if folder.name in (SUB_TEST, SUB_ACTIVE) and (folder.parent / "config.yaml").exists():
                continue  # the config of a test pass inside a run
            with open(cfg) as f:
                config = yaml.safe_load(f) or {}
            scalars = read_scalars(folder)
            test = read_scalars(folder / SUB_TEST) if (folder / SUB_TEST).is_dir() else {}
            if "test/error" not in test and "test/error" in scalars:
                test = scalars
            active = read_scalars(folder / SUB_ACTIVE) if (folder / SUB_ACTIVE).is_dir() else {}
            runs.append(Run(folder, config, scalars, test, active))
    if not runs:
        where = ", ".join(map(str, roots))
        raise ReportError(
            f"no runs found under {where}: a run folder holds the config.yaml saved by `maxdrop fit` "
            "and its TensorBoard event files (see lightning_logs/README.md)"
        )
    return runs


def _name_groups(keys: list[dict[str, Any]]) -> list[str]:
    """Short names: the config file stem when the runner recorded one, else the differing keys."""
    varying = sorted({k for key in keys for k in key if len({repr(o.get(k)) for o in keys}) > 1})
    names = []
    for key in keys:
        parts = [f"{k.split('.')[-1] if k.count('.') else k}={key.get(k)}" for k in varying if key.get(k) is not None]
        names.append(", ".join(parts) or "default")
    return names


def _grid_layout(runs: list[Run]) -> bool:
    """Whether the runs lie as `maxdrop grid` lays them out: <root>/<config name>/seed_<seed>/."""
    return all(r.path.name.startswith("seed_") for r in runs)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped into configs: by config folder in the grid layout, else by config content."""
    if _grid_layout(runs):
        groups: dict[str, list[Run]] = defaultdict(list)
        for run in runs:
            groups[run.path.parent.name].append(run)
        return {name: sorted(v, key=lambda r: str(r.seed)) for name, v in sorted(groups.items())}
    by_key: dict[str, list[Run]] = {}
    keys: dict[str, dict[str, Any]] = {}
    for run in runs:
        key = config_key(run.config)
        k = repr(sorted(key.items(), key=lambda kv: kv[0]))
        by_key.setdefault(k, []).append(run)
        keys[k] = key
    names = dict(zip(keys, _name_groups(list(keys.values())), strict=True))
    return {names[k]: sorted(v, key=lambda r: str(r.seed)) for k, v in by_key.items()}


def differing_keys(a: dict[str, Any], b: dict[str, Any], compared: tuple[str, ...]) -> list[str]:
    """Config keys in which two runs differ. A key that only one side has counts only under a compared
    prefix (elsewhere it is an argument that a newer maxdrop added, saved at its default)."""
    ka, kb = config_key(a), config_key(b)

    def counts(k: str) -> bool:
        return (k in ka and k in kb) or any(k == c or k.startswith(c + ".") for c in compared)

    return sorted(k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k) and counts(k))


def _subtrees(keys: list[str], compared: tuple[str, ...]) -> list[str]:
    """Keys under a compared prefix shortened to the prefix plus one level (e.g. ``...slots.stage1``)."""
    out = []
    for k in keys:
        prefix = next((c for c in compared if k.startswith(c + ".")), None)
        short = k if prefix is None else prefix + "." + k[len(prefix) + 1 :].split(".")[0]
        if short not in out:
            out.append(short)
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def significance(base: list[float], other: list[float], base_seeds, other_seeds, test: str) -> float | None:
    from scipy import stats

    if len(base) < 2 or len(other) < 2:
        return None
    if test == "paired":
        pairs = dict(zip(base_seeds, base, strict=True))
        common = [(pairs[s], v) for s, v in zip(other_seeds, other, strict=True) if s in pairs]
        if len(common) < 2:
            return None
        return float(stats.ttest_rel([c[0] for c in common], [c[1] for c in common]).pvalue)
    return float(stats.ttest_ind(base, other, equal_var=False).pvalue)


def build_table(groups: dict[str, list[Run]], baseline: str | None, test: str) -> tuple[list[str], list[list[str]]]:
    header = [
        "config",
        "seeds",
        "test error % (mean ± std)",
        "min",
        "max",
        "best val error %",
        "test error %, MaxDropout on in eval",
        "dropped fraction, last epoch",
        "train time (min)",
        f"p vs {baseline} ({'paired t-test by seed' if test == 'paired' else 'Welch t-test'})" if baseline else "p",
    ]
    base = groups.get(baseline) if baseline else None
    rows = []
    for name, runs in groups.items():
        errs = [r.test_error for r in runs]
        mean = statistics.fmean(errs)
        std = statistics.stdev(errs) if len(errs) > 1 else float("nan")
        best_val = [min(v for _, v in r.epochs) for r in runs if r.epochs]
        active = [r.last("test/error", "active") for r in runs]
        active = [a for a in active if a is not None]
        slots: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            for slot, series in r.dropped_fractions().items():
                slots[slot].append(series[-1][1])
        # 3 significant digits: with scope "tensor" MaxDropout often drops a few units in 10^5
        dropped = "; ".join(f"{s} {statistics.fmean(v):.3g}" for s, v in sorted(slots.items())) or "-"
        times = [t for r in runs if (t := r.train_seconds) is not None]
        p = None
        if base is not None and name != baseline:
            p = significance([r.test_error for r in base], errs, [r.seed for r in base], [r.seed for r in runs], test)
        rows.append(
            [
                name,
                str(len(runs)),
                f"{mean:.2f} ± {_fmt(std)}",
                _fmt(min(errs)),
                _fmt(max(errs)),
                _fmt(statistics.fmean(best_val)) if best_val else "-",
                _fmt(statistics.fmean(active)) if active else "-",
                dropped,
                _fmt(statistics.fmean(times) / 60, 1) if times else "-",
                ("baseline" if name == baseline else _fmt(p, 3)) if baseline else "-",
            ]
        )
    return header, rows


def _aligned(curves: list[dict[int, float]]):
    """The epochs every curve has, and the (curves, epochs) array of their values there."""
    import numpy as np

    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    return epochs, np.array([[c[e] for e in epochs] for c in curves])


def _save(fig, ax, path: Path, ylabel: str, title: str, legend_size: int) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(groups: dict[str, list[Run]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in groups.items():
        curves = [dict(r.epochs) for r in runs if r.epochs]
        if curves:
            epochs, vals = _aligned(curves)
            ax.plot(epochs, vals.mean(0), marker="o", label=f"{name} (n={len(curves)})")
            ax.fill_between(epochs, vals.min(0), vals.max(0), alpha=0.2)
    written = [
        _save(
            fig,
            ax,
            out / "val_error.png",
            "validation error (%)",
            "Validation error: mean over seeds, band = min..max",
            8,
        )
    ]

    series = {}
    for name, runs in groups.items():
        per_slot: dict[str, list[dict[int, float]]] = defaultdict(list)
        for r in runs:
            for slot, s in r.dropped_fractions().items():
                per_slot[slot].append(dict(s))
        for slot, curves in per_slot.items():
            epochs, vals = _aligned(curves)
            series[(name, slot)] = (epochs, vals.mean(0))
    if series:
        fig, ax = plt.subplots(figsize=(8, 5))
        for (name, slot), (epochs, mean) in sorted(series.items()):
            ax.plot(epochs, mean, marker="o", label=f"{name}: {slot}")
        if all(m.min() > 0 for _, m in series.values()):
            ax.set_yscale("log")  # scopes differ by orders of magnitude
        title = "Units each dropout slot shut off in training, per epoch (mean over seeds)"
        written.append(_save(fig, ax, out / "dropped_fraction.png", "dropped fraction (training)", title, 7))
    return written


def report(
    roots: list[Path],
    out: Path,
    baseline: str | None = None,
    test: str = "welch",
    compared: tuple[str, ...] = DEFAULT_COMPARED,
    allow_differences: bool = False,
) -> str:
    if test not in ("welch", "paired"):
        raise ReportError(f"unknown test {test!r}; allowed: 'welch', 'paired'")
    runs = find_runs(roots)
    finished = [r for r in runs if r.test_error is not None]
    unfinished = [r for r in runs if r.test_error is None]
    if not finished:
        raise ReportError(
            f"none of the {len(runs)} runs found has a test result (test/error): run `maxdrop test` on them "
            "first; unfinished: " + ", ".join(str(r.path) for r in unfinished)
        )
    groups = group_runs(finished)
    if baseline is not None and baseline not in groups:
        raise ReportError(f"baseline {baseline!r} is not one of the configs found: {', '.join(groups)}")
    lines = []
    for name, runs in groups.items():
        mixed = sorted({k for r in runs[1:] for k in differing_keys(runs[0].config, r.config, ())})
        if mixed and not allow_differences:
            raise ReportError(
                f"the runs of config {name!r} differ among themselves in "
                + ", ".join(mixed)
                + ": a row must hold seeds of one config (or pass --allow-differences)"
            )
    if baseline is not None:
        for name, runs in groups.items():
            if name == baseline:
                continue
            diff = differing_keys(groups[baseline][0].config, runs[0].config, compared)
            extra = [k for k in diff if not any(k == c or k.startswith(c + ".") for c in compared)]
            if extra and not allow_differences:
                raise ReportError(
                    f"config {name!r} differs from the baseline {baseline!r} in more than the compared keys "
                    f"({', '.join(compared)}): also in "
                    + ", ".join(extra)
                    + ". Compare configs that differ in the compared keys only, name more with --compare, "
                    "or pass --allow-differences."
                )
            lines.append(
                f"- `{name}` differs from `{baseline}` in: " + ", ".join(f"`{k}`" for k in _subtrees(diff, compared))
            )
    out.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(groups, baseline, test)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    if lines:
        md += ["", "Compared keys:", *lines]
    if unfinished:
        md += ["", f"Unfinished runs (no test result; not averaged in): {len(unfinished)}"]
        md += [f"- {r.path}" for r in unfinished]
    pngs = plot(groups, out)
    md += ["", *[f"![{p.stem}]({p.name})" for p in pngs]]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maxdrop report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders that contain runs")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.md/.csv and the PNGs go")
    parser.add_argument("--baseline", help="config name to test the others against")
    parser.add_argument("--test", default="welch", choices=["welch", "paired"], help="significance test")
    parser.add_argument(
        "--compare",
        action="append",
        help=f"config key prefix that the configs may differ in (repeatable; default: {', '.join(DEFAULT_COMPARED)})",
    )
    parser.add_argument(
        "--allow-differences", action="store_true", help="compare configs that differ in other keys too"
    )
    args = parser.parse_args(argv)
    compared = tuple(args.compare) if args.compare else DEFAULT_COMPARED
    try:
        text = report(args.runs, args.out, args.baseline, args.test, compared, args.allow_differences)
    except ReportError as e:
        print(f"maxdrop report: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
