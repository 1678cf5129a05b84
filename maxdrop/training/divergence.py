"""Stop a fit at the first non-finite training loss, with a message a user can act on, before any checkpoint
of the diverged weights is written, and without a host-device sync per step."""

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


def _learning_rates(trainer: pl.Trainer) -> tuple[float, ...]:
    rates = [g["lr"] for opt in trainer.optimizers for g in opt.param_groups if "lr" in g]
    # A tensor LR (capturable optimizers) is not read here: that would be a sync per step.
    return tuple(dict.fromkeys(float(lr) for lr in rates if not isinstance(lr, torch.Tensor)))


def _last_checkpoint(trainer: pl.Trainer) -> str:
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            for path in (cb.last_model_path, cb.best_model_path):
                if path and Path(path).is_file():
                    return f"the last good checkpoint is {path} (weights before the divergence)"
    return "no checkpoint had been saved yet"


class DivergenceGuard(pl.Callback):
    """Raises :class:`TrainingDiverged` when a training step's loss was NaN or infinite.

    Each step only copies its loss into a small buffer on the loss's device (one device-side copy, no
    sync). The buffer is read on the host every ``check_every_n_steps`` steps, at each validation and
    epoch end, at the end of training and before every checkpoint is written (``on_save_checkpoint``), so
    no checkpoint holds diverged weights and ``last.ckpt`` stays the last good one. The message names the
    first bad step. Under DDP the ranks agree at each look (one tiny all-reduce), so all stop together.

    Args:
        enabled: False turns the check off.
        check_every_n_steps: steps between two looks at the buffer (each look is one device sync); a run
            that diverged trains at most this many steps more before it stops.
    """

    def __init__(self, enabled: bool = True, check_every_n_steps: int = 50) -> None:
        super().__init__()
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be an integer >= 1, got {check_every_n_steps!r}")
        self.enabled = bool(enabled)
        self.check_every_n_steps = check_every_n_steps
        self._losses: torch.Tensor | None = None  # (check_every_n_steps,) float32 on the loss's device
        self._steps: list[tuple[int, int, int, tuple[float, ...]]] = []  # (global step, epoch, batch, LRs)
        self._last_finite: tuple[float, int] | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.enabled:
            return
        loss = _loss_of(outputs)
        if loss is None:
            return
        if self._losses is None or self._losses.device != loss.device:
            self._check(trainer)
            self._losses = torch.empty(self.check_every_n_steps, dtype=torch.float32, device=loss.device)
        self._losses[len(self._steps)] = loss.float()  # a device-side copy: no sync
        self._steps.append((trainer.global_step, trainer.current_epoch, batch_idx, _learning_rates(trainer)))
        if len(self._steps) == self.check_every_n_steps:
            self._check(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._check(trainer)  # called on every rank before the file is written

    def _check(self, trainer: pl.Trainer) -> None:
        """Look at the buffered losses (one device sync); raise at the first non-finite one."""
        if not self.enabled or not self._steps:
            return
        values = self._losses[: len(self._steps)].tolist()
        steps, self._steps = self._steps, []
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        finite = bad is None
        if trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if finite:
            self._last_finite = (values[-1], steps[-1][0])
            return
        if bad is not None and bad > 0:
            self._last_finite = (values[bad - 1], steps[bad - 1][0])
        last = (
            f"the last finite loss was {self._last_finite[0]:.4g} at step {self._last_finite[1]}"
            if self._last_finite
            else "no step had a finite loss"
        )
        if bad is None:  # finite here, not on another rank
            step, epoch, batch_idx, lrs = steps[0]
            where, shown = f"or before step {steps[-1][0]} (epoch {steps[-1][1]})", "non-finite on another rank"
        else:
            step, epoch, batch_idx, lrs = steps[bad]
            where, shown = f"step {step} (epoch {epoch}, batch {batch_idx})", values[bad]
        rates = ", ".join(f"{lr:.4g}" for lr in lrs) or "unknown"
        raise TrainingDiverged(
            f"training diverged at {where}: the loss is {shown}; {last}; learning rate {rates}. The run stopped at "
            f"step {trainer.global_step} (the loss is checked every {self.check_every_n_steps} steps, at each "
            f"epoch end and before every checkpoint), before any checkpoint of the diverged weights was written: "
            f"{_last_checkpoint(trainer)}. Lower the learning rate (e.g. --model.init_args.optimizer.init_args.lr) "
            "or warm it up, clip gradients (--trainer.gradient_clip_val 1.0), or check the data for NaN/inf values."
        )
