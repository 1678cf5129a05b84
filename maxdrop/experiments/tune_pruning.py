"""The Lightning side of `maxdrop tune`: report the validation metric of a trial's `maxdrop fit` to Optuna,
stop the fit when the pruner says so, and leave the outcome in ``objective.json`` for the tuner.

Each trial runs as a `maxdrop fit` subprocess (the same code path as a grid's run); the tuner passes the
study through the environment (``MAXDROP_TUNE_STORAGE``, ``MAXDROP_TUNE_STUDY``, ``MAXDROP_TUNE_TRIAL_ID``,
``MAXDROP_TUNE_METRIC``, ``MAXDROP_TUNE_PRUNER``), so the callback is inert in any fit started without them. It follows
optuna-integration's ``PyTorchLightningPruningCallback`` (not installable beside lightning 2.6 here): report
after each validation, ask ``should_prune``; it stops the trainer rather than raising, so the fit ends
cleanly with its logs and checkpoints and the tuner records the trial as PRUNED. Under DDP only rank 0
talks to the storage and its decision is broadcast to every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl

from maxdrop.utils.atomic import atomic_write_text

OBJECTIVE = "objective.json"
# Beside it when the trial was pruned: the run's command sequence skips its test pass (maxdrop/cli/sequence.py).
PRUNED_MARKER = "pruned"


def open_storage(storage: str):
    """An RDB URL (``sqlite:///...``, ``postgresql://...``) as is, anything else a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in storage:
        return optuna.storages.RDBStorage(storage)
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(storage))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def make_pruner(spec: str):
    """``median[:startup[:warmup]]`` (MedianPruner; defaults 4 trials, 10 epochs), ``threshold:UPPER``
    (ThresholdPruner: prune when the metric exceeds UPPER; deterministic) or ``none``."""
    import optuna

    name, *args = spec.split(":")
    try:
        if name == "median" and len(args) <= 2:
            startup, warmup = [int(a) for a in args] + [4, 10][len(args) :]
            return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup)
        if name == "threshold" and len(args) == 1:
            return optuna.pruners.ThresholdPruner(upper=float(args[0]))
        if name == "none" and not args:
            return optuna.pruners.NopPruner()
    except ValueError:
        pass
    raise ValueError(f"--pruner {spec!r}: allowed are median[:STARTUP[:WARMUP]], threshold:UPPER and none")


class OptunaPruning(pl.Callback):
    """Reports ``metric`` after each validation as the intermediate value at step = epoch."""

    def __init__(self) -> None:
        self.trial = None
        self.metric = os.environ.get("MAXDROP_TUNE_METRIC", "val/error")
        self.values: dict[int, float] = {}
        self.pruned = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or "MAXDROP_TUNE_STUDY" not in os.environ or trainer.global_rank != 0:
            return
        import optuna

        study = optuna.load_study(
            study_name=os.environ["MAXDROP_TUNE_STUDY"],
            storage=open_storage(os.environ["MAXDROP_TUNE_STORAGE"]),
            pruner=make_pruner(os.environ.get("MAXDROP_TUNE_PRUNER", "none")),
        )
        self.trial = optuna.trial.Trial(study, int(os.environ["MAXDROP_TUNE_TRIAL_ID"]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or "MAXDROP_TUNE_STUDY" not in os.environ:
            return
        prune = False
        if self.trial is not None:
            value = trainer.callback_metrics.get(self.metric)
            if value is None:
                raise ValueError(
                    f"maxdrop tune: the metric {self.metric!r} was not logged; "
                    f"logged: {sorted(trainer.callback_metrics)}"
                )
            step = trainer.current_epoch
            self.values[step] = float(value)
            self.trial.report(float(value), step)
            prune = self.trial.should_prune()
        prune = trainer.strategy.broadcast(prune, src=0)
        if prune:
            self.pruned = True
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.trial is None or not self.values or trainer.log_dir is None:
            return
        last = max(self.values)
        write_json(
            Path(trainer.log_dir) / OBJECTIVE,
            {"metric": self.metric, "value": self.values[last], "step": last, "pruned": self.pruned,
             "values": {str(k): v for k, v in self.values.items()}},
        )  # fmt: skip
        if self.pruned:
            atomic_write_text(Path(trainer.log_dir) / PRUNED_MARKER, f"pruned at epoch {last}\n")
