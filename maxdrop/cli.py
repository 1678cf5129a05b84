"""The ``maxdrop`` command: LightningCLI for CIFAR classification with configurable dropout slots.

    maxdrop fit --config configs/quickstart.yaml --data.data_dir ../shared/data/cifar10-jpeg.tar.gz
    maxdrop test --config configs/quickstart.yaml --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt
    maxdrop slots maxdrop.models.ResNet18
    maxdrop grid configs/paper/*.yaml --seeds 0 1 2    (maxdrop.grid)
    maxdrop report lightning_logs/study                 (maxdrop.report)

``fit``, ``validate``, ``test`` and ``predict`` are LightningCLI subcommands: the model and the data
are chosen by ``class_path`` (subclass mode), ``data.num_classes`` is linked into
``model.init_args.num_classes``, the seed defaults to 0, each run's config is saved beside its
event files in ``lightning_logs/version_N/config.yaml``, and checkpoints keep the last epoch and
the best one by validation error (configurable under ``--checkpoint.*``). ``slots`` lists a
backbone's dropout slots. Bad input ends with one paragraph on stderr and exit status 2, a failed run
(e.g. a diverged loss) with one paragraph and exit status 1 (set ``MAXDROP_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from maxdrop.callbacks.divergence import DivergenceGuard, TrainingDiverged
from maxdrop.callbacks.hparams import HParamsSession
from maxdrop.callbacks.requeue import SlurmRequeue, resumes_from_hpc_checkpoint
from maxdrop.callbacks.tensorboard_layout import CustomScalarsLayout
from maxdrop.models.slots import SlottedBackbone
from maxdrop.module import ClassificationModule

__all__ = ["LastAndBestCheckpoint", "MaxdropCLI", "PredictionWriter", "UsageError", "main"]

PROG = "maxdrop"
DESCRIPTION = (
    "Train and evaluate CIFAR classifiers with MaxDropout and its peers in config-chosen dropout slots. "
    "Besides fit/validate/test/predict: `maxdrop slots <backbone class>` lists a backbone's slots, "
    "`maxdrop grid` runs configs x seeds, `maxdrop report` tabulates and plots the runs (each has --help)."
)
#: Commands that are not LightningCLI subcommands: name -> module whose main(argv) -> exit status runs it.
TOOLS = {"grid": "maxdrop.grid", "report": "maxdrop.report"}
#: The errors that bad input raises (from our classes, Lightning, jsonargparse and the OS); reported as
#: one paragraph instead of a traceback.
USER_ERRORS = (ValueError, TypeError, KeyError, ImportError, OSError, MisconfigurationException)


class UsageError(Exception):
    """Bad command-line input, reported as one paragraph and exit status 2."""


def _one_paragraph(message: str, limit: int = 1200) -> str:
    """Collapse a (possibly nested, multi-line) error message into one line of at most ``limit`` chars."""
    text = re.sub(r"\s+", " ", str(message)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Lines of jsonargparse's nested messages that only restate the types tried and the value given.
_NOISE = re.compile(
    r"^\s*(-\s*)?(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value"
    r"|Expected a <class 'NoneType'>|Expected a <class 'dict'>|Expected a path but)"
)


def _simplify(message: str) -> str:
    """The part of a jsonargparse error message that says what is wrong."""
    missing = re.search(r"File does not exist: '?([^'\n]+)'?", message)
    if missing and 'key "config"' in message:
        return f"config file '{missing.group(1)}' does not exist (given to --config)"
    lines = [line for line in str(message).splitlines() if not _NOISE.match(line)]
    text = " ".join(lines)
    given = re.search(r"Given value: ([\w.]+)\n", str(message))  # the backbone's union type reports it so
    unknown = re.search(r"(module '[\w.]+' has no attribute '\w+'|No module named '[\w.]+')\.? Got value: (.+)$", text)
    if unknown is None and given:
        unknown = re.search(r"(module '[\w.]+' has no attribute '\w+'|No module named '[\w.]+')\.?()", text)
    if unknown:
        value = re.search(r"class_path='([^']+)'", unknown.group(2))
        where = ".".join(re.findall(r'Parser key "([^"]+)"', text))
        name = value.group(1) if value else (unknown.group(2).strip() or (given.group(1) if given else ""))
        return f"unknown class_path {name!r} (in {where}): {unknown.group(1)}"
    return text


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain (jsonargparse re-raises a class's own error inside its own)."""
    while err.__cause__ is not None and isinstance(err.__cause__, USER_ERRORS):
        err = err.__cause__
    return err


def _report(message: str, status: int = 2) -> NoReturn:
    """One paragraph on stderr, then exit: status 2 for bad input, 1 for a run that failed."""
    wrapped = textwrap.fill(
        _one_paragraph(message),
        width=100,
        initial_indent=f"{PROG}: error: ",
        subsequent_indent="  ",
        break_on_hyphens=False,  # paths and options stay whole, so they can be copied
        break_long_words=False,
    )
    hint = f"`{PROG} --help` lists the options; " if status == 2 else ""
    sys.stderr.write(wrapped + f"\n  ({hint}MAXDROP_DEBUG=1 shows the traceback)\n")
    raise SystemExit(status)


class MaxdropArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one short paragraph instead of usage plus nested detail."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if os.environ.get("MAXDROP_DEBUG") or not self.exit_on_error:
            super().error(message, ex)
        _report(_simplify(message))


class LastAndBestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the latest epoch, beside the best by the monitor.

    Lightning 2.6 refreshes ``last.ckpt`` only in a step where it also wrote a top-k checkpoint, so with
    a monitored metric that did not improve, ``last.ckpt`` would stay at an older epoch (a resume from it
    would repeat epochs, and the last epoch's weights, which the paper reports, would be lost).
    """

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: Any) -> None:
        # Skipped when the step was already saved (then last.ckpt was written with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PredictionWriter(BasePredictionWriter):
    """Saves the predictions of ``maxdrop predict`` in the run folder.

    The file holds ``{"preds": (N,) int64 classes, "probs": (N, num_classes) float32}`` in the order of
    the predict dataloader (the test split for :class:`~maxdrop.data.CIFARDataModule`). A run with
    several processes writes one file per rank, suffixed ``.rank<r>``.

    Args:
        filename: file name, relative to the run folder (``trainer.log_dir``) unless absolute.
    """

    def __init__(self, filename: str = "predictions.pt") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(self, trainer: Any, pl_module: Any, predictions: Sequence[Any], batch_indices: Any) -> None:
        if predictions and isinstance(predictions[0], list):  # several predict dataloaders: keep the first
            predictions = predictions[0]
        if not predictions:
            return
        out = {key: torch.cat([p[key] for p in predictions]).cpu() for key in predictions[0]}
        path = Path(self.filename)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        if trainer.world_size > 1:
            path = path.with_name(f"{path.name}.rank{trainer.global_rank}")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, path)
        rank_zero_info(f"predictions of {len(out['preds'])} images saved to {path}")


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

    def before_instantiate_classes(self) -> None:
        threads = self._get(self.config, "num_threads")
        if threads is not None:
            if threads < 1:
                raise UsageError(f"num_threads must be >= 1 (or null for one per core), got {threads}")
            torch.set_num_threads(threads)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # Always on, outside the config: stop at a NaN loss, the TensorBoard layout and HParams session.
        extra = [DivergenceGuard(), CustomScalarsLayout(), HParamsSession()]
        return super()._instantiate_trainer(config, [*callbacks, *extra])

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
                    f"truncated or corrupt ({type(err).__name__}: {_one_paragraph(err, 300)})"
                ) from err
        super()._parse_ckpt_path()


def _import(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UsageError(f"cannot import {path!r} ({err}); give a full path such as maxdrop.models.ResNet18") from err


def _option_values(argv: Sequence[str]) -> dict[str, Any]:
    """``--key value`` pairs -> {key: YAML-parsed value}."""
    out: dict[str, Any] = {}
    it = iter(argv)
    for key in it:
        if not key.startswith("--"):
            raise UsageError(f"expected --NAME VALUE, got {key!r}")
        name, _, value = key[2:].partition("=")
        if not _:
            value = next(it, None)
            if value is None:
                raise UsageError(f"option {key} needs a value")
        out[name] = yaml.safe_load(value)
    return out


def _print_any_model(spec: dict[str, Any], input_size: Sequence[int]) -> None:
    """Every position of any model (a WithSlots spec marks the filled ones)."""
    from maxdrop.models.positions import format_positions, model_positions
    from maxdrop.models.with_slots import WithSlots, build_from_spec

    cls = _import(spec["class_path"])
    init = dict(spec.get("init_args") or {})
    filled: dict[str, str] = {}
    if cls is WithSlots:
        wrapped = WithSlots(**init)
        input_size = wrapped.input_size
        for name, where in wrapped.slot_positions().items():
            filled[where.partition(" ")[2]] = f"{name} ({where.partition(' ')[0]})"
        spec, init = init["model"], {}
        cls = None
    name = spec["class_path"] if isinstance(spec, dict) else type(spec).__name__
    try:
        model = build_from_spec(spec, "the model")
    except (ValueError, TypeError) as err:
        raise UsageError(
            f"cannot build {name} with the arguments given ({err}); give them as --NAME VALUE, e.g. "
            f"`{PROG} slots torchvision.models.resnet18 --num_classes 10`"
        ) from None  # the message says it all; the cause would replace it (see _root_cause)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{name} built a {type(model).__name__}, not an nn.Module: it has no positions to list")
    try:
        positions, traced = model_positions(model, torch.zeros(2, *input_size))
    except RuntimeError as err:
        raise UsageError(
            f"a dry forward of {name} on a batch of {'x'.join(map(str, input_size))} inputs fails ({err}); give "
            "the input size it takes as --input_size C H W"
        ) from err
    how = (
        "torch.fx graph nodes, named as torchvision's get_graph_node_names names them"
        if traced
        else "module boundaries (the model does not trace with torch.fx)"
    )
    print(
        f"{spec['class_path'] if isinstance(spec, dict) else type(model).__name__}: {len(positions)} positions "
        f"({how}); output shapes per image at input {'x'.join(map(str, input_size))}\n"
    )
    print(format_positions(positions, filled))


def slots_main(argv: Sequence[str]) -> None:
    """``maxdrop slots CLASS_OR_CONFIG [--init_arg VALUE ...]``: a backbone's slots, or any model's positions."""
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {PROG} slots BACKBONE_CLASS|MODEL_CLASS_PATH|CONFIG.yaml [--ARG VALUE ...]\n\n"
            "Lists the dropout slots of a maxdrop backbone (name: where it sits) and the full name of every\n"
            "slot position, built with its default arguments or the ones given; for any other model (a class or\n"
            "factory function, or the backbone of a config, e.g. a maxdrop.models.WithSlots) every position in\n"
            "forward order with its type, output shape (dry forward, --input_size, default 3 32 32) and calls, e.g.\n"
            f"  {PROG} slots maxdrop.models.ResNet18\n  {PROG} slots maxdrop.models.WideResNet --depth 16\n"
            f"  {PROG} slots torchvision.models.resnet18 --num_classes 10\n"
            f"  {PROG} slots configs/any/resnet18_torchvision_maxdropout.yaml"
        )
        return
    target, options = argv[0], _option_values(argv[1:])
    input_size = options.pop("input_size", (3, 32, 32))
    if target.endswith((".yaml", ".yml")):
        path = Path(target)
        if not path.is_file():
            raise UsageError(f"config file {target!r} does not exist")
        config = yaml.safe_load(path.read_text()) or {}
        spec = (config.get("model") or {}).get("init_args", {}).get("backbone")
        if not isinstance(spec, dict) or "class_path" not in spec:
            raise UsageError(f"{target} has no model.init_args.backbone with a class_path")
        return _print_any_model(spec, input_size)
    cls = _import(target)
    from maxdrop.models.with_slots import WithSlots

    if not (isinstance(cls, type) and issubclass(cls, SlottedBackbone)) or cls is WithSlots:
        return _print_any_model({"class_path": target, "init_args": options}, input_size)
    parser = ArgumentParser(prog=f"{PROG} slots {target}", exit_on_error=False)
    parser.add_class_arguments(cls, skip={"slots"})
    try:
        cfg = parser.parse_args(list(argv[1:]))
    except Exception as err:  # noqa: BLE001 (jsonargparse's ArgumentError)
        raise UsageError(str(err)) from err
    init = {k: v for k, v in cfg.as_dict().items() if k != "__path__"}
    model = cls(**init)
    args = ", ".join(f"{k}={v!r}" for k, v in init.items())
    print(f"{target}({args})\n\nslots (fill with `slots: {{<name>: {{class_path: ...}}}}`):")
    width = max(map(len, cls.SLOTS))
    for name, where in cls.SLOTS.items():
        print(f"  {name:<{width}}  {where}")
    print("\nslot positions in forward order (the names that dropout_slots() and SparsityMonitor use):")
    positions = model.slot_positions()
    width = max(map(len, positions))
    for name, where in positions.items():
        print(f"  {name:<{width}}  {where}")


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
    except TrainingDiverged as err:
        if os.environ.get("MAXDROP_DEBUG"):
            raise
        _report(str(err), status=1)
    except (UsageError, *USER_ERRORS) as err:
        if os.environ.get("MAXDROP_DEBUG"):
            raise
        cause = _root_cause(err)
        _report(str(cause) if isinstance(cause, (UsageError, ValueError)) else f"{type(cause).__name__}: {cause}")


if __name__ == "__main__":
    main()
