"""Writing of :class:`~maxdrop.callbacks.SparsityMonitor`'s figures: to every logger and
``trainer.callback_metrics``, to TensorBoard histograms, and to the JSON summary in the run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from maxdrop.monitoring.sparsity_reduce import DROPPED, NONFINITE, NUMEL_IN, NUMEL_OUT, NZ_IN, NZ_OUT, SEEN
from maxdrop.utils.atomic import atomic_write_text

__all__ = [
    "RECORD_FIELDS",
    "SUMMARY_FORMAT",
    "SummaryFile",
    "load_sparsity_summary",
    "slot_figures",
    "slot_totals",
]

#: ``format`` field of the summary file; bumped when its layout changes (new fields do not).
SUMMARY_FORMAT = "maxdrop-sparsity/1"
#: Fields of one summary record besides ``epoch``, ``step`` and ``slot``; None where undefined.
RECORD_FIELDS = (
    "dropped",
    "seen",
    "dropped_fraction",
    "train_zero_in",
    "train_zero_out",
    "val_zero_in",
    "val_zero_out",
    "nonfinite",
)


def _fraction(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def slot_figures(row: Tensor, layer_counted: bool) -> dict[str, Any]:
    """Counts and fractions of one slot from a global row of the reduced sums."""
    nz_in, numel_in, nz_out, numel_out = (int(v) for v in row[[NZ_IN, NUMEL_IN, NZ_OUT, NUMEL_OUT]])
    if layer_counted:
        dropped, seen = int(row[DROPPED]), int(row[SEEN])
    else:  # net shut-off: elements that entered nonzero and left zero
        dropped, seen = nz_in - nz_out, numel_in
    return {
        "dropped": dropped,
        "seen": seen,
        "dropped_fraction": _fraction(dropped, seen),
        "zero_in": _fraction(numel_in - nz_in, numel_in),
        "zero_out": _fraction(numel_out - nz_out, numel_out),
        "nonfinite": int(row[NONFINITE]),
    }


def slot_totals(names: list[str], layer_counted: dict[str, bool]) -> dict[str, list[int]]:
    """Slots that fill several positions -> the row indices of their positions in ``names``.

    A slot with positions is reported per position as ``<slot>.<i>`` (``block.0``, ``stages.3``);
    its total sums their rows (every column is a count, so the sum is exact). Only where all
    positions count alike (all by the layer, or all by hooks) and no slot is named ``<slot>``.
    """
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        slot, _, index = name.rpartition(".")
        if slot and index.isdigit():
            groups.setdefault(slot, []).append(i)
    return {
        slot: rows
        for slot, rows in groups.items()
        if len(rows) > 1 and slot not in names and len({layer_counted[names[i]] for i in rows}) == 1
    }


def log_figures(
    trainer: pl.Trainer, logged: dict[str, float], metrics: dict[str, float], step: int, epoch: int | None = None
) -> None:
    """Logs ``metrics`` at ``step`` to every logger and ``trainer.callback_metrics``; records them in ``logged``."""
    if not metrics:
        return
    logged.update(metrics)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    to_log = dict(metrics) if epoch is None else {**metrics, "epoch": epoch}
    for logger in trainer.loggers:  # loggers write on global rank 0 only
        logger.log_metrics(to_log, step=step)


def write_histograms(trainer: pl.Trainer, names: list[str], per: dict[str, Tensor], scalars: Tensor, step: int) -> None:
    """Per-channel drop rate and mean |x| histograms (rank 0, TensorBoard loggers); NaN/inf values skipped."""
    if not trainer.is_global_zero:
        return
    writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    for name, stats in per.items():
        per_channel_numel = scalars[names.index(name), NUMEL_IN] / stats.shape[1]
        if per_channel_numel <= 0:
            continue
        values = {
            "channel_drop_rate": (stats[0] - stats[1]) / per_channel_numel,
            "channel_magnitude": stats[2] / per_channel_numel,
        }
        for key, v in values.items():
            v = v[torch.isfinite(v)]  # a channel that saw a NaN or an inf has no mean
            if v.numel():
                for w in writers:
                    w.add_histogram(f"maxdrop/{name}/{key}", v, global_step=step)


class SummaryFile:
    """The per-epoch, per-slot records of a run, rewritten atomically as ``sparsity.json``.

    Args:
        path: the file, or None to keep the records in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: dict[tuple[int, str], dict[str, Any]] = {}

    def keep_earlier_epochs(self, epoch: int) -> None:
        """Resuming into the same run folder: keep the file's records of the epochs before ``epoch``."""
        if self.path is None or epoch <= 0 or not self.path.is_file():
            return
        try:
            old = load_sparsity_summary(self.path)
        except ValueError as err:
            rank_zero_warn(f"SparsityMonitor: not keeping the old records of {self.path}: {err}")
            return
        for rec in old["records"]:
            if rec["epoch"] < epoch:
                self.records[(rec["epoch"], rec["slot"])] = rec

    def update(self, epoch: int, step: int, fields: dict[str, dict[str, Any]]) -> None:
        for name, values in fields.items():
            rec = self.records.setdefault(
                (epoch, name), {"epoch": epoch, "step": step, "slot": name, **dict.fromkeys(RECORD_FIELDS)}
            )
            rec["step"] = max(rec["step"], step)
            rec.update(values)

    def write(self, world_size: int, slots: dict[str, nn.Module], layer_counted: dict[str, bool]) -> None:
        if self.path is None:
            return
        order = list(slots)

        def key(k: tuple[int, str]) -> tuple[int, int, str]:
            # By epoch, then in the backbone's slot order (slots only in an older file come last).
            return k[0], order.index(k[1]) if k[1] in order else len(order), k[1]

        summary = {
            "format": SUMMARY_FORMAT,
            "world_size": world_size,
            "slots": {
                name: {
                    "class": f"{type(layer).__module__}.{type(layer).__qualname__}",
                    "repr": repr(layer),
                    "dropped_counted_by": "layer" if layer_counted[name] else "hooks",
                }
                for name, layer in slots.items()
            },
            "totals": {total: [order[i] for i in rows] for total, rows in slot_totals(order, layer_counted).items()},
            "records": [self.records[k] for k in sorted(self.records, key=key)],
        }
        # Atomic: readers see the old file or the new one, never a half-written one.
        atomic_write_text(self.path, json.dumps(summary, indent=1) + "\n")


def load_sparsity_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the summary a :class:`~maxdrop.callbacks.SparsityMonitor` wrote.

    Args:
        path: the JSON file, or the run folder that holds ``sparsity.json``.

    Returns:
        ``{"format", "world_size", "slots": {slot: {"class", "repr", "dropped_counted_by"}},
        "totals": {slot: [its positions]}, "records": [{"epoch", "step", "slot", "dropped", "seen",
        "dropped_fraction", "train_zero_in", "train_zero_out", "val_zero_in", "val_zero_out",
        "nonfinite"}, ...]}``, one record per epoch and slot, and per epoch and total of a slot
        with several positions (``slot`` then names the total; ``nonfinite`` and ``totals`` are
        absent from files of older versions).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a sparsity summary of a format this version reads.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "sparsity.json"
    if not path.is_file():
        raise FileNotFoundError(f"no sparsity summary at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a sparsity summary of format {SUMMARY_FORMAT!r} (found {found!r})")
    return data
