"""One row per run in TensorBoard's HPARAMS tab: the run's hyperparameters and its final metrics.

:class:`HParamsSession` writes an HParams session (the plugin's ``session_start_info``) into each
run folder with the hyperparameters a comparison needs (:func:`run_hparams`), and logs
``val/best_error``; the plugin shows every scalar of the run and of its sub-folders (the grid's
``test/``) as the session's metrics, by their last value. Without an experiment-level summary the
plugin lists first the hyperparameters whose values differ between the runs, so
``tensorboard --logdir <grid root>`` puts what a grid varies in the first columns.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams.summary_v2 import hparams_pb

from maxdrop.models.slots import find_dropout_slots

__all__ = ["HParamsSession", "run_hparams"]

#: A slot layer's attributes that are recorded (the main argument of each maxdrop and torch layer).
SLOT_ARGS = ("p", "rate", "drop_prob", "h_ratio", "block_size", "scope")
BEST_VAL_ERROR = "val/best_error"


def _scalar(value: Any) -> bool | int | float | str | None:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return None


def run_hparams(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, bool | int | float | str]:
    """The hyperparameters a run is compared by, flat: ``{name: bool | number | str}``.

    The seed, the backbone class (and ``backbone/model``, the network a WithSlots wraps), each slot's
    layer class (``slot/<name>``) and main argument (``slot/<name>/p``, ``rate``, ...), the data set,
    batch size and augmentation switches (``augment/...``), the optimizer, learning rate, weight
    decay, LR schedule, label smoothing, ``max_epochs`` / ``max_steps`` and the number of processes.
    """
    hp: dict[str, Any] = {}
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        hp["seed"] = int(seed)
    backbone = getattr(pl_module, "backbone", pl_module)
    hp["backbone"] = type(backbone).__name__
    if isinstance(getattr(backbone, "model_name", None), str):  # WithSlots: the network it wraps
        hp["backbone/model"] = backbone.model_name
    for name, layer in (find_dropout_slots(pl_module) or {}).items():
        hp[f"slot/{name}"] = type(layer).__name__
        for arg in SLOT_ARGS:
            value = _scalar(getattr(layer, arg, None))
            if value is not None:
                hp[f"slot/{name}/{arg}"] = value
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        for key in ("dataset", "batch_size"):
            value = _scalar(getattr(dm, key, None))
            if value is not None:
                hp[key] = value
        augment = getattr(dm, "augment", None)
        if dataclasses.is_dataclass(augment):
            for f in dataclasses.fields(augment):
                value = _scalar(getattr(augment, f.name))
                if value is not None:
                    hp[f"augment/{f.name}"] = value
    if trainer.optimizers:
        opt = trainer.optimizers[0]
        group = opt.param_groups[0]
        hp["optimizer"] = type(opt).__name__
        hp["lr"] = float(group.get("initial_lr", group.get("lr", float("nan"))))
        if "weight_decay" in group:
            hp["weight_decay"] = float(group["weight_decay"])
    configs = trainer.lr_scheduler_configs
    hp["lr_scheduler"] = type(configs[0].scheduler).__name__ if configs else "none"
    smoothing = _scalar(getattr(pl_module, "label_smoothing", None))
    if smoothing is not None:
        hp["label_smoothing"] = smoothing
    hp["max_epochs"] = -1 if trainer.max_epochs is None else int(trainer.max_epochs)
    hp["max_steps"] = int(trainer.max_steps)
    hp["world_size"] = int(trainer.world_size)
    return hp


def _session_end_pb(status: int) -> summary_pb2.Summary:
    data = plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    )
    summary = summary_pb2.Summary()
    summary.value.add(
        tag=metadata.SESSION_END_INFO_TAG,
        metadata=metadata.create_summary_metadata(data),
        tensor=metadata.NULL_TENSOR,
    )
    return summary


class HParamsSession(pl.Callback):
    """Writes the run's HParams session to each TensorBoard logger of a run folder of its own.

    A logger with a ``sub_dir`` (the grid's ``test/`` pass inside a fit's folder) gets no session of
    its own: its scalars are metrics of the enclosing fit's session. Lightning's own hparams summary
    (an experiment per run, which would hide the others' hyperparameters) is turned off; its
    ``hparams.yaml`` is still saved.

    Args:
        enabled: False turns the callback off (no session; Lightning's own hparams summary stays as it was).
    """

    def __init__(self, enabled: bool = True) -> None:
        super().__init__()
        self.enabled = bool(enabled)
        self.best_val_error: float | None = None
        self._writers: list[Any] = []

    @staticmethod
    def _session_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger) and not lg.sub_dir]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger._default_hp_metric = False  # no per-run experiment summary (see the class doc)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero or self._writers:
            return
        loggers = self._session_loggers(trainer)
        if not loggers:
            return
        hparams = run_hparams(trainer, pl_module)
        for logger in loggers:
            # The trial id is the table's first column: the run's folder names it (a grid's config/seed_k)
            # where the default would be a hash of the hyperparameters.
            summary = hparams_pb(hparams, trial_id=f"{logger.name}/{logger.version}")
            writer = logger.experiment._get_file_writer()
            writer.add_summary(summary, trainer.global_step)
            self._writers.append(writer)

    def _end(self, status: int) -> None:
        for writer in self._writers:
            writer.add_summary(_session_end_pb(status))
            writer.flush()
        self._writers = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        error = trainer.callback_metrics.get("val/error")
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if not self.enabled or not fitting or error is None or not torch.isfinite(error):
            return
        if self.best_val_error is None or float(error) < self.best_val_error:
            self.best_val_error = float(error)
        trainer.callback_metrics[BEST_VAL_ERROR] = torch.tensor(self.best_val_error)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step of val/error
        for logger in trainer.loggers:
            logger.log_metrics({BEST_VAL_ERROR: self.best_val_error}, step=step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(api_pb2.STATUS_SUCCESS)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end(api_pb2.STATUS_SUCCESS)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end(api_pb2.STATUS_FAILURE)

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_error": self.best_val_error}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_val_error = state_dict.get("best_val_error")
