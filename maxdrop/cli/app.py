"""The ``maxdrop`` command: LightningCLI for CIFAR classification with configurable dropout slots.

    maxdrop fit --config configs/quickstart.yaml --data.data_dir ../shared/data/cifar10-jpeg.tar.gz
    maxdrop test --config configs/quickstart.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    maxdrop slots maxdrop.models.ResNet18
    maxdrop grid configs/paper/*.yaml --seeds 0 1 2    (maxdrop.experiments.grid)
    maxdrop report lightning_logs/study                 (maxdrop.experiments.report)

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands: the model and the data
are chosen by ``class_path`` (subclass mode), ``data.num_classes`` is linked into
``model.init_args.num_classes``, the seed defaults to 0, each run's config is saved beside its
event files in ``lightning_logs/version_N/config.yaml``, and checkpoints keep the last epoch and
the best one by validation error (configurable under ``--checkpoint.*``), written atomically
(:class:`~maxdrop.training.checkpoints.AtomicCheckpointIO`). The guards are in the config too, each with an
``enabled`` switch: ``divergence`` (stop at a NaN/inf loss), ``tensorboard_layout``, ``hparams``, ``requeue``.
``slots`` lists a backbone's dropout slots.

Errors: the run starts when Lightning enters its first loop (the sanity check or first training epoch of
``fit``, the loop of ``validate``/``test``/``predict``). Bad input, found before that (parsing, building the
classes, ``setup``, loading and checking a checkpoint, ``configure_optimizers``), ends with one paragraph on
stderr and exit status 2 (``MAXDROP_DEBUG=1`` shows the traceback). Anything raised after it is a failed run:
exit status 1, its traceback, then one paragraph on the last line; a diverged loss and a checkpoint that
cannot be written are diagnosed in that paragraph alone.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from maxdrop.cli.errors import INPUT_ERRORS, PROG, RunFailed, UsageError, one_paragraph, report, simplify, usage_error
from maxdrop.cli.slots_command import slots_main
from maxdrop.monitoring.drop_masks import DropMaskImages
from maxdrop.monitoring.hparams import HParamsSession
from maxdrop.monitoring.tensorboard_layout import CustomScalarsLayout
from maxdrop.training.checkpoints import AtomicCheckpointIO, CheckpointWriteError, LastAndBestCheckpoint
from maxdrop.training.divergence import DivergenceGuard, TrainingDiverged
from maxdrop.training.module import ClassificationModule
from maxdrop.training.prediction_writer import PredictionWriter
from maxdrop.training.requeue import SlurmRequeue, resumes_from_hpc_checkpoint

__all__ = ["LastAndBestCheckpoint", "MaxdropCLI", "PredictionWriter", "UsageError", "main"]

DESCRIPTION = (
    "Train and evaluate CIFAR classifiers with MaxDropout and its peers in config-chosen dropout slots. "
    "Besides fit/validate/test/predict: `maxdrop slots <backbone class>` lists a backbone's slots, "
    "`maxdrop grid` runs configs x seeds, `maxdrop tune` tunes knobs with Optuna, "
    "`maxdrop report` tabulates and plots the runs (each has --help)."
)
#: Commands that are not LightningCLI subcommands: name -> module whose main(argv) -> exit status runs it.
TOOLS = {"grid": "maxdrop.experiments.grid", "report": "maxdrop.experiments.report", "tune": "maxdrop.experiments.tune"}
#: Run failures whose message says all there is to say (where, why, what to do): no traceback.
DIAGNOSED_FAILURES = (TrainingDiverged, CheckpointWriteError)
#: Callbacks that only write to a logger: without one they step aside (Lightning's raise instead).
LOGGER_ONLY_CALLBACKS = (LearningRateMonitor, DeviceStatsMonitor, CustomScalarsLayout, HParamsSession, DropMaskImages)


def quiet_lightning() -> None:
    """Silence what a user cannot act on: Lightning's litlogger advertisement, the ``LeafSpec`` deprecation
    that Lightning's own pytree code triggers on recent torch, the non-empty checkpoint-folder warning
    (SaveRunConfig already refuses a fresh fit into a run's folder; a resume writes there on purpose) and
    predict's batch-indices notice."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # PredictionWriter does not use batch indices, which Lightning cannot infer from a TensorLoader.
    warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices fetched from your dataloader")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoLitloggerTip) for f in logger.filters):
            logger.addFilter(_NoLitloggerTip())


class _NoLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


class _RunPhase(pl.Callback):
    """Marks when the run starts: the first loop Lightning enters (the sanity-check validation, the first
    training epoch, or the validate/test/predict loop). Everything before it (parsing, building the classes,
    ``setup``, loading and checking a checkpoint, ``configure_optimizers``) is checking the input."""

    def __init__(self) -> None:
        self.started = False

    def _start(self, *_: Any) -> None:
        self.started = True

    on_sanity_check_start = on_train_start = on_validation_start = on_test_start = on_predict_start = _start


class MaxdropArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one short paragraph instead of usage plus nested detail."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if os.environ.get("MAXDROP_DEBUG") or not self.exit_on_error:
            super().error(message, ex)
        report(simplify(message))


class SaveRunConfig(SaveConfigCallback):
    """Saves the run's config as ``config.yaml`` in its run folder, never over another run's.

    A run that continues in the same folder (``fit --ckpt_path ...`` resuming, or ``validate``/``test``/
    ``predict`` logging into a fit's folder) keeps the fit's ``config.yaml`` and saves its own beside it as
    ``config.<stage>.<n>.yaml``. A fresh ``fit`` into a folder that already holds a run is refused, as
    Lightning does, so that two runs' logs are never mixed.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir and not self.overwrite:
            log_dir = Path(trainer.log_dir)
            ckpt_path = self.config.get("ckpt_path")
            # A requeued SLURM job resumes from its hpc checkpoint without --ckpt_path.
            continuing = stage != "fit" or bool(ckpt_path) or resumes_from_hpc_checkpoint(trainer, ckpt_path)
            taken = trainer.strategy.broadcast(trainer.is_global_zero and (log_dir / self.config_filename).is_file())
            if taken and not continuing:
                raise UsageError(
                    f"the run folder {log_dir} already holds a run ({self.config_filename}): a fresh fit there would "
                    "mix two runs' logs and checkpoints. Resume that run with --ckpt_path (e.g. "
                    f"{log_dir / 'checkpoints' / 'last.ckpt'}), or give this one another folder (the logger's "
                    "version or save_dir)"
                )
            name = self.config_filename
            if trainer.is_global_zero and taken:  # a continuing run: its config goes beside the fit's
                stage_name, n = getattr(stage, "value", stage), 1  # Lightning passes a TrainerFn enum
                while (log_dir / f"config.{stage_name}.{n}.yaml").exists():
                    n += 1
                name = f"config.{stage_name}.{n}.yaml"
            self.config_filename = trainer.strategy.broadcast(name)
        super().setup(trainer, pl_module, stage)


class MaxdropCLI(LightningCLI):
    """LightningCLI with the maxdrop defaults: links, checkpointing, seed, config saving, clear errors."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        quiet_lightning()
        kwargs.setdefault("parser_kwargs", {"prog": PROG, "description": DESCRIPTION})
        super().__init__(
            model_class=ClassificationModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            parser_class=MaxdropArgumentParser,
            save_config_callback=SaveRunConfig,
            auto_configure_optimizers=False,  # the module's own optimizer/lr_scheduler arguments do it
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--num_threads",
            type=int | None,
            default=None,
            help="Threads of PyTorch's CPU ops (torch.set_num_threads); null = PyTorch's default, one per core. "
            "1 is faster on a CPU shared with other jobs, where a thread that waits for a busy core stalls the rest.",
        )
        parser.set_defaults(
            {
                "model": {"class_path": "maxdrop.module.ClassificationModule"},
                "data": {"class_path": "maxdrop.data.CIFARDataModule"},
            }
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        # Always on, configurable under --checkpoint.*: the last epoch and the best by validation error.
        parser.add_lightning_class_args(LastAndBestCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/error",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-epoch{epoch:03d}-val_error{val/error:.2f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        # Inside a SLURM job: on --signal's SIGUSR1, save at a step boundary, requeue, resume exactly.
        parser.add_lightning_class_args(SlurmRequeue, "requeue")
        # The guards, on by default, each with an `enabled` switch: stop at a NaN/inf loss (checked every
        # N steps and before each checkpoint), TensorBoard's custom-scalars layout and HParams session.
        parser.add_lightning_class_args(DivergenceGuard, "divergence")
        parser.add_lightning_class_args(CustomScalarsLayout, "tensorboard_layout")
        parser.add_lightning_class_args(HParamsSession, "hparams")

    def before_instantiate_classes(self) -> None:
        threads = self._get(self.config, "num_threads")
        if threads is not None:
            if threads < 1:
                raise UsageError(f"num_threads must be >= 1 (or null for one per core), got {threads}")
            torch.set_num_threads(threads)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # a user's own CheckpointIO is kept
            config = {**config, "plugins": [*plugins, AtomicCheckpointIO()]}
        self._run_phase = _RunPhase()
        trainer = super()._instantiate_trainer(config, [*callbacks, self._run_phase])
        if not trainer.loggers:
            idle = [cb for cb in trainer.callbacks if isinstance(cb, LOGGER_ONLY_CALLBACKS)]
            shown = sorted({type(cb).__name__ for cb in idle if getattr(cb, "enabled", True)})
            trainer.callbacks = [cb for cb in trainer.callbacks if cb not in idle]
            if shown:
                rank_zero_warn(
                    f"no logger (trainer.logger is false): {', '.join(shown)} only log and are off for this run"
                )
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except Exception as err:
            phase = getattr(self, "_run_phase", None)
            if isinstance(err, UsageError):
                raise
            if phase is None or not phase.started:  # still checking the input: setup, checkpoint, optimizers
                if isinstance(err, INPUT_ERRORS):
                    raise usage_error(err) from err
                raise
            raise RunFailed(self._failure_summary(err)) from err

    def _failure_summary(self, err: BaseException) -> str:
        if isinstance(err, DIAGNOSED_FAILURES):
            return str(err)
        trainer = self.trainer
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or ""
        resume = (
            f"The last checkpoint is {ckpt} (resume with --ckpt_path {ckpt})"
            if ckpt and Path(ckpt).is_file()
            else "No checkpoint had been saved"
        )
        return (
            f"the run failed at step {trainer.global_step} (epoch {trainer.current_epoch}) with "
            f"{type(err).__name__}: {one_paragraph(err, 400)}; the traceback above shows where. {resume}"
        )

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        # "last", "best", "hpc", "registry..." are resolved by Lightning; anything else is a file.
        if ckpt_path and ckpt_path not in ("last", "best", "hpc") and not ckpt_path.startswith("registry"):
            path = Path(ckpt_path)
            if not path.is_file():
                raise UsageError(f"checkpoint {ckpt_path!r} does not exist (--ckpt_path)")
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 (any failure to load means the file is unusable)
                raise UsageError(
                    f"checkpoint {ckpt_path!r} cannot be loaded: it is not a valid Lightning checkpoint or is "
                    f"truncated or corrupt ({type(err).__name__}: {one_paragraph(err, 300)})"
                ) from err
        try:
            super()._parse_ckpt_path()  # reads the checkpoint's hyperparameters
        except INPUT_ERRORS as err:
            raise usage_error(err) from err

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except INPUT_ERRORS as err:  # a class refusing its arguments, a missing data path, ...
            raise usage_error(err) from err


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``maxdrop`` console script (``args``: the command line without the program name)."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv and argv[0] == "slots":
            slots_main(argv[1:])
        elif argv and argv[0] in TOOLS:
            raise SystemExit(importlib.import_module(TOOLS[argv[0]]).main(argv[1:]))
        else:
            MaxdropCLI(args=None if args is None else argv)
    except RunFailed as failed:
        err = failed.__cause__
        if not isinstance(err, DIAGNOSED_FAILURES):  # a crash: the traceback is what a developer needs
            traceback.print_exception(err)
        report(str(failed), status=1, hint="")
    except UsageError as err:  # bad input, found before the run started (RunFailed wraps the rest)
        if os.environ.get("MAXDROP_DEBUG"):
            raise
        report(str(err))


if __name__ == "__main__":
    main()
