"""Runs of `maxdrop report`: reading run folders (config + TensorBoard scalars) and grouping them into rows.

A *run* is a folder holding the ``config.yaml`` that LightningCLI saved at ``fit`` and the event files
of that fit; its test results lie in the same folder or its ``test/`` sub-folder, the test pass with
MaxDropout left on in eval in ``test_active_in_eval/``. Nothing else is needed (no checkpoints), so the
small summaries of a study can be kept in git and reported again later.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_COMPARED", "ReportError", "Run", "differing_keys", "find_runs", "group_runs"]

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
    def train_acc(self) -> float | None:
        """Training accuracy of the last epoch, in percent (measured in training mode, as trained)."""
        acc = self.last("train/acc", "fit")
        return None if acc is None else 100.0 * acc

    @property
    def gap(self) -> float | None:
        """Train-test gap in points: last-epoch training accuracy minus test accuracy."""
        if self.train_acc is None or self.test_error is None:
            return None
        return self.train_acc - (100.0 - self.test_error)

    @property
    def ece(self) -> float | None:
        """Test expected calibration error, in percent."""
        ece = self.last("test/ece")
        return None if ece is None else 100.0 * ece

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


def compared_subtrees(keys: list[str], compared: tuple[str, ...]) -> list[str]:
    """Keys under a compared prefix shortened to the prefix plus one level (e.g. ``...slots.stage1``)."""
    out = []
    for k in keys:
        prefix = next((c for c in compared if k.startswith(c + ".")), None)
        short = k if prefix is None else prefix + "." + k[len(prefix) + 1 :].split(".")[0]
        if short not in out:
            out.append(short)
    return out
