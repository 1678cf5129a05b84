"""What `maxdrop tune` leaves beside its trials: best.yaml, trials.csv/.md, history.png and knobs.png."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import yaml

from maxdrop.experiments.tune_space import Space
from maxdrop.utils.atomic import atomic_write_text

TUNE_CALLBACK = "maxdrop.experiments.tune_pruning.OptunaPruning"


def best_config(trial_config: Path) -> dict:
    """The trial's saved config without what belongs to the trial: its logger, the tuning callback, the
    checkpoint path. `maxdrop fit --config best.yaml` (or a grid) then trains the best trial's settings."""
    config = yaml.safe_load(trial_config.read_text())
    trainer = config.get("trainer", {})
    trainer.pop("logger", None)
    callbacks = trainer.get("callbacks") or []
    trainer["callbacks"] = [c for c in callbacks if not (isinstance(c, dict) and c.get("class_path") == TUNE_CALLBACK)]
    config.pop("ckpt_path", None)
    return config


def trial_rows(study, space: Space) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        steps = sorted(t.intermediate_values)
        row = {"trial": t.number, "state": t.state.name, "value": t.value, "last epoch": steps[-1] if steps else None}
        row.update({k.name: t.params.get(k.name) for k in space.knobs})
        row["seconds"] = round(t.duration.total_seconds()) if t.duration else None
        rows.append(row)
    return rows


def _markdown(rows: list[dict], best: int | None) -> str:
    if not rows:
        return "(no trials)\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v)) for v in r.values()]
        if r["trial"] == best:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(study, space: Space, out: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.PRUNED and t.intermediate_values]
    sign = 1 if study.direction.name == "MINIMIZE" else -1
    fig, ax = plt.subplots(figsize=(6, 3.2), layout="constrained")
    ax.plot([t.number for t in done], [t.value for t in done], "o", color="C0", label="complete trial")
    ax.plot(
        [t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
        "o", mfc="none", color="C0", label="pruned (last reported)",
    )  # fmt: skip
    best, xs, ys = math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = min(best, sign * t.value)
        xs.append(t.number)
        ys.append(sign * best)
    ax.step(xs, ys, where="post", color="C0", alpha=0.6, label="best so far")
    ax.set(xlabel="trial", ylabel=metric, title=f"{study.study_name}: optimization history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.savefig(out / "history.png", dpi=120)
    plt.close(fig)

    n = len(space.knobs)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1.6, 3), layout="constrained", sharey=True, squeeze=False)
    for ax, knob in zip(axes[0], space.knobs, strict=True):
        x = [t.params.get(knob.name) for t in done]
        if knob.type == "categorical":
            labels = [str(c) for c in knob.choices]
            x = [labels.index(str(v)) for v in x]
            ax.set_xticks(range(len(labels)), labels)
        ax.plot(x, [t.value for t in done], "o", color="C0", alpha=0.8, label="complete trial")
        if knob.log:
            ax.set_xscale("log")
        ax.set(xlabel=knob.name)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(f"{study.study_name}: each knob vs {metric} (complete trials)")
    fig.savefig(out / "knobs.png", dpi=120)
    plt.close(fig)


def write_outputs(study, space: Space, study_dir: Path, metric: str = "objective"):
    """Write the outputs; returns the best trial (None when no trial completed)."""
    from optuna.trial import TrialState

    study_dir.mkdir(parents=True, exist_ok=True)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    rows = trial_rows(study, space)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(study_dir / "trials.csv", buf.getvalue())
    atomic_write_text(study_dir / "trials.md", _markdown(rows, best.number if best else None))
    if best is not None:
        trial_config = Path(best.user_attrs["run_dir"]) / "config.yaml"
        header = f"# Best trial {best.number} of study {study.study_name} ({space.path}): {best.params}\n"
        atomic_write_text(study_dir / "best.yaml", header + yaml.safe_dump(best_config(trial_config), sort_keys=False))
    if complete or rows:
        _plots(study, space, study_dir, metric)
    return best
