"""`maxdrop report`: tables and plots over many runs, grouped by config.

A *run* is a folder holding the ``config.yaml`` that LightningCLI saved at ``fit`` and the
TensorBoard event files of that fit. Its test results are read from the same folder or from its
``test/`` sub-folder; the test pass with MaxDropout left on in eval (the authors' protocol), when
there is one, from ``test_active_in_eval/``. Runs are grouped by their config with the seed, the
paths and the logger removed, so the seeds of one config form one row.

Each row is compared with the baseline (``--baseline``) and, optionally, with a reference of its own
(``--versus ROW=REF``, e.g. a dropout variant against ``nn.Dropout`` at the same rate): the mean
difference in test error with its 95 % confidence interval, the uncorrected t-test p-value and the
Holm–Bonferroni-corrected one (over all comparisons of that column set). Figures:
:mod:`maxdrop.experiments.report_plots`.

    maxdrop report lightning_logs/study --baseline no_dropout --out docs/results
    maxdrop report results/study2/n100 --baseline no_dropout --test paired \
        --versus 'topk_dropout_p01=dropout_p01' --versus 'topk_dropout_p03=dropout_p03' --out docs/results/study2_n100
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from maxdrop.experiments.report_plots import plot
from maxdrop.experiments.report_runs import (  # noqa: F401  (re-exported: the report's public API)
    DEFAULT_COMPARED,
    ReportError,
    Run,
    compared_subtrees,
    config_key,
    differing_keys,
    find_runs,
    group_runs,
    read_scalars,
)
from maxdrop.experiments.report_stats import TESTS, Comparison, compare, holm


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


#: Per-run test measures shown as table columns and in ``measures.png``: label -> value of a run.
MEASURES = {
    "test error %": lambda r: r.test_error,
    "test ECE %": lambda r: r.ece,
    "test NLL": lambda r: r.last("test/nll"),
    "train–test gap (points)": lambda r: r.gap,
}


def _mean(values: list[float | None], digits: int = 2) -> str:
    present = [v for v in values if v is not None]
    return _fmt(statistics.fmean(present), digits) if present else "-"


def _diff(c: Comparison | None) -> str:
    return "-" if c is None else f"{c.diff:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"


def _p(p: float | None) -> str:
    return "-" if p is None or math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def comparisons(groups: dict[str, list[Run]], references: dict[str, str], test: str) -> dict[str, Comparison | None]:
    """Test error of each row in ``references`` against its reference, Holm-corrected over all of them."""
    by_seed = {name: {r.seed: r.test_error for r in runs} for name, runs in groups.items()}
    names = list(references)
    raw = [compare(by_seed[references[n]], by_seed[n], test) for n in names]
    return dict(zip(names, holm(raw), strict=True))


def comparison_columns(
    groups: dict[str, list[Run]], references: dict[str, str], test: str, label: str
) -> tuple[list[str], dict[str, list[str]]]:
    """Header cells and per-row cells of one comparison column set (``label`` names the reference)."""
    result = comparisons(groups, references, test)
    m = sum(c is not None for c in result.values())
    header = [
        f"Δ test error vs {label}, points [95 % CI]",
        f"p vs {label} ({TESTS[test]}), uncorrected",
        f"p vs {label}, Holm–Bonferroni over {m} rows",
    ]
    cells = {name: [_diff(c), _p(c and c.p), _p(c and c.p_holm)] for name, c in result.items()}
    return header, cells


def build_table(
    groups: dict[str, list[Run]], baseline: str | None, test: str, versus: dict[str, str] | None = None
) -> tuple[list[str], list[list[str]]]:
    header = [
        "config",
        "seeds",
        "test error % (mean ± std)",
        "min",
        "max",
        "best val error %",
        "test error %, MaxDropout on in eval",
        "test ECE %",
        "test NLL",
        "train acc % (last epoch)",
        "train–test gap (points)",
        "dropped fraction, last epoch",
        "train time (min)",
    ]
    column_sets = []
    if baseline:
        refs = {n: baseline for n in groups if n != baseline}
        h, cells = comparison_columns(groups, refs, test, baseline)
        column_sets.append((h, {**cells, baseline: ["baseline", "-", "-"]}))
    if versus:
        h, cells = comparison_columns(groups, versus, test, "reference")
        column_sets.append((["reference", *h], {n: [versus[n], *c] for n, c in cells.items()}))
    for h, _ in column_sets:
        header += h
    rows = []
    for name, runs in groups.items():
        errs = [r.test_error for r in runs]
        std = statistics.stdev(errs) if len(errs) > 1 else float("nan")
        best_val = [min(v for _, v in r.epochs) for r in runs if r.epochs]
        slots: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            for slot, series in r.dropped_fractions().items():
                slots[slot].append(series[-1][1])
        # 3 significant digits: with scope "tensor" MaxDropout often drops a few units in 10^5
        dropped = "; ".join(f"{s} {statistics.fmean(v):.3g}" for s, v in sorted(slots.items())) or "-"
        times = [t / 60 for r in runs if (t := r.train_seconds) is not None]
        row = [
            name,
            str(len(runs)),
            f"{statistics.fmean(errs):.2f} ± {_fmt(std)}",
            _fmt(min(errs)),
            _fmt(max(errs)),
            _mean(best_val),
            _mean([r.last("test/error", "active") for r in runs]),
            _mean([r.ece for r in runs]),
            _mean([r.last("test/nll") for r in runs], 3),
            _mean([r.train_acc for r in runs]),
            _mean([r.gap for r in runs]),
            dropped,
            _mean(times, 1),
        ]
        for h, cells in column_sets:
            row += cells.get(name, ["-"] * len(h))
        rows.append(row)
    return header, rows


def parse_versus(pairs: list[str], names: list[str]) -> dict[str, str]:
    """``ROW=REF`` entries (ROW may be a glob pattern such as ``topk_*_p01``) -> {row: reference}."""
    out: dict[str, str] = {}
    for pair in pairs:
        row, sep, ref = pair.partition("=")
        if not sep or not row or not ref:
            raise ReportError(f"--versus takes ROW=REFERENCE (config names; ROW may be a glob pattern), got {pair!r}")
        if ref not in names:
            raise ReportError(
                f"reference {ref!r} of --versus {pair!r} is not one of the configs found: {', '.join(names)}"
            )
        matched = [n for n in names if fnmatch.fnmatchcase(n, row) and n != ref]
        if not matched:
            raise ReportError(
                f"--versus {pair!r}: no config other than the reference matches {row!r}; configs: {', '.join(names)}"
            )
        for n in matched:
            if out.get(n, ref) != ref:
                raise ReportError(f"config {n!r} is given two references by --versus: {out[n]!r} and {ref!r}")
            out[n] = ref
    return out


def _check_pair(
    groups: dict[str, list[Run]], name: str, ref: str, role: str, compared: tuple[str, ...], allow: bool
) -> list[str]:
    """The compared subtrees in which row ``name`` differs from ``ref``; an error if it differs elsewhere too."""
    diff = differing_keys(groups[ref][0].config, groups[name][0].config, compared)
    extra = [k for k in diff if not any(k == c or k.startswith(c + ".") for c in compared)]
    if extra and not allow:
        raise ReportError(
            f"config {name!r} differs from the {role} {ref!r} in more than the "
            f"compared keys ({', '.join(compared)}): also in "
            + ", ".join(extra)
            + ". Compare configs that differ in the compared keys only, name more with --compare, "
            "or pass --allow-differences."
        )
    return compared_subtrees(diff, compared)


def report(
    roots: list[Path],
    out: Path,
    baseline: str | None = None,
    test: str = "welch",
    compared: tuple[str, ...] = DEFAULT_COMPARED,
    allow_differences: bool = False,
    versus: list[str] | None = None,
) -> str:
    """Write report.md, report.csv and the figures of the runs under ``roots`` into ``out``; returns report.md.

    ``versus``: ``ROW=REFERENCE`` entries for the second comparison column set (see :func:`parse_versus`).
    """
    if test not in TESTS:
        raise ReportError(f"unknown test {test!r}; allowed: {', '.join(map(repr, TESTS))}")
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
    references = parse_versus(versus or [], list(groups))
    for name, runs in groups.items():
        mixed = sorted({k for r in runs[1:] for k in differing_keys(runs[0].config, r.config, ())})
        if mixed and not allow_differences:
            raise ReportError(
                f"the runs of config {name!r} differ among themselves in "
                + ", ".join(mixed)
                + ": a row must hold seeds of one config (or pass --allow-differences)"
            )
    lines = []
    if baseline is not None:
        for name in groups:
            if name != baseline:
                keys = _check_pair(groups, name, baseline, "baseline", compared, allow_differences)
                lines.append(f"- `{name}` differs from `{baseline}` in: " + ", ".join(f"`{k}`" for k in keys))
    for name, ref in references.items():
        _check_pair(groups, name, ref, "reference", compared, allow_differences)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = build_table(groups, baseline, test, references)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    if baseline is not None or references:
        md += [
            "",
            f"Δ: mean difference in test error (row minus reference; negative = fewer errors), 95 % CI from the "
            f"{TESTS[test]}. Holm–Bonferroni: each column's p-values corrected together over all rows it compares "
            "(family-wise error rate); the uncorrected p stands beside it.",
        ]
    if lines:
        md += ["", "Compared keys:", *lines]
    if unfinished:
        md += ["", f"Unfinished runs (no test result; not averaged in): {len(unfinished)}"]
        md += [f"- {r.path}" for r in unfinished]
    pngs = plot(groups, out, baseline, MEASURES)
    md += ["", *[f"![{p.stem}]({p.name})" for p in pngs]]
    text = "\n".join(md) + "\n"
    (out / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="maxdrop report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or folders that contain runs")
    parser.add_argument("--out", type=Path, default=Path("report"), help="where report.md/.csv and the PNGs go")
    parser.add_argument("--baseline", help="config name to test the others against")
    parser.add_argument(
        "--versus",
        action="append",
        metavar="ROW=REF",
        help="also compare config ROW (a name or glob pattern) with config REF, in a second column set "
        "(repeatable; e.g. topk_dropout_p01=dropout_p01)",
    )
    parser.add_argument(
        "--test", default="welch", choices=list(TESTS), help="t-test of the comparisons (paired: by seed)"
    )
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
        text = report(args.runs, args.out, args.baseline, args.test, compared, args.allow_differences, args.versus)
    except ReportError as e:
        print(f"maxdrop report: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
