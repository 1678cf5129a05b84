"""Stop a fit at the first non-finite training loss, with a message a user can act on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["DivergenceGuard", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the message says where, with what learning rate, and
    which checkpoint is the last good one."""


def _loss_of(outputs: Any) -> torch.Tensor | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return loss.detach() if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _learning_rates(trainer: pl.Trainer) -> str:
    rates = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups if "lr" in g]
    return ", ".join(f"{float(lr):.4g}" for lr in dict.fromkeys(rates)) or "unknown"


def _last_checkpoint(trainer: pl.Trainer) -> str:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            for path in (cb.last_model_path, cb.best_model_path):
                if path and Path(path).is_file():
                    return f"the last good checkpoint is {path} (weights before the divergence)"
    return "no checkpoint had been saved yet"


class DivergenceGuard(pl.Callback):
    """Raises :class:`TrainingDiverged` after the first training step whose loss is NaN or infinite.

    It raises in ``on_train_batch_end``, before any checkpoint callback of that step, so no checkpoint
    holds the diverged weights and ``last.ckpt`` stays the last good epoch. Costs one host-device sync
    of the loss per step; under DDP the ranks agree first (one tiny all-reduce per step), so that all
    stop together instead of waiting on each other.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last_finite: tuple[float, int] | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = _loss_of(outputs)
        if loss is None:
            return
        value = float(loss)
        finite = math.isfinite(value)
        if trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            self._last_finite = (value, trainer.global_step)
            return
        last = (
            f"the last finite loss was {self._last_finite[0]:.4g} at step {self._last_finite[1]}"
            if self._last_finite
            else "no step had a finite loss"
        )
        shown = value if not math.isfinite(value) else "non-finite on another rank"
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx})"
        raise TrainingDiverged(
            f"training diverged at {where}: the loss is {shown}; "
            f"{last}; learning rate {_learning_rates(trainer)}. The run stopped before saving this step's weights: "
            f"{_last_checkpoint(trainer)}. Lower the learning rate (e.g. --model.init_args.optimizer.init_args.lr) "
            "or warm it up, clip gradients (--trainer.gradient_clip_val 1.0), or check the data for NaN/inf values."
        )
