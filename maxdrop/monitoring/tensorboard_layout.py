"""TensorBoard's CUSTOM SCALARS layout of a run: one chart per measure, one line per dropout slot.

The Scalars tab shows each slot x measure as a card of its own; the layout that
:class:`CustomScalarsLayout` writes puts the slots side by side instead (and the loss, error and
learning-rate curves), and TensorBoard merges the identical layouts of a grid's runs into one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

from maxdrop.models.slots import find_dropout_slots
from maxdrop.monitoring.sparsity import SparsityMonitor

__all__ = ["CustomScalarsLayout", "custom_scalars_layout"]

#: Charts of every run: title -> regexes of the tags drawn as its lines.
METRIC_CHARTS = {
    "loss": [r"^train/loss_step$", r"^train/loss_epoch$", r"^val/loss$", r"^test/loss$"],
    "error (%)": [r"^train/error$", r"^val/error$", r"^val/best_error$", r"^test/error$"],
    "learning rate": [r"^lr-"],
}
#: Per-slot charts of the epoch figures: title -> tag suffix (``maxdrop/<slot>/<suffix>``).
EPOCH_CHARTS = {
    "dropped fraction": "dropped_fraction",
    "train: zero fraction entering": "train_zero_in",
    "train: zero fraction leaving": "train_zero_out",
    "val: zero fraction entering": "val_zero_in",
    "val: zero fraction leaving": "val_zero_out",
    "batches with NaN/inf entering": "nonfinite",
}
#: Per-slot charts of the step-level figures (``maxdrop_step/<slot>/<suffix>``).
STEP_CHARTS = {
    "dropped fraction": "dropped_fraction",
    "zero fraction entering": "zero_in",
    "zero fraction leaving": "zero_out",
}


def _slot_regex(prefix: str, slots: Iterable[str], suffix: str) -> str:
    names = "|".join(re.escape(s) for s in slots)
    return f"^{prefix}/({names})/{re.escape(suffix)}$"


def custom_scalars_layout(
    slots: Iterable[str], step_logging: bool = False, validation: bool = True
) -> dict[str, dict[str, list]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: ``{category: {chart: ["Multiline", regexes]}}``.

    Args:
        slots: the slot names (none: the metric charts only).
        step_logging: also the charts of the step-level values (``maxdrop_step/...``).
        validation: include the validation zero-fraction charts.
    """
    slots = list(slots)
    layout: dict[str, dict[str, list]] = {}
    if slots:
        layout["maxdrop: slots per epoch"] = {
            title: ["Multiline", [_slot_regex("maxdrop", slots, suffix)]]
            for title, suffix in EPOCH_CHARTS.items()
            if validation or not suffix.startswith("val_")
        }
        if step_logging:
            layout["maxdrop: slots per step"] = {
                title: ["Multiline", [_slot_regex("maxdrop_step", slots, suffix)]]
                for title, suffix in STEP_CHARTS.items()
            }
    layout["metrics"] = {title: ["Multiline", list(tags)] for title, tags in METRIC_CHARTS.items()}
    return layout


class CustomScalarsLayout(pl.Callback):
    """Writes :func:`custom_scalars_layout` once into each TensorBoard run folder of its own (loggers
    without a ``sub_dir``), with the slots that a :class:`~maxdrop.callbacks.SparsityMonitor` of the
    same trainer measures; without a monitor or slots, the metric charts only.

    Args:
        enabled: False turns the callback off (no layout is written).
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        self._written: set[str] = set()

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, SparsityMonitor)), None)
        slots = (find_dropout_slots(pl_module) or {}) if monitor is not None else {}
        layout = custom_scalars_layout(
            slots,
            step_logging=monitor is not None and monitor.log_every_n_batches > 0,
            validation=monitor is None or monitor.validation,
        )
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and not logger.sub_dir and logger.log_dir not in self._written:
                logger.experiment.add_custom_scalars(layout)
                self._written.add(logger.log_dir)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module)
