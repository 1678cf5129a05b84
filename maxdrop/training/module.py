"""The image-classification LightningModule: a backbone, cross-entropy, accuracy and error rate.

The optimizer and the LR scheduler come from the config (``OptimizerCallable`` and
``LRSchedulerCallable``, given as ``class_path``/``init_args``); the defaults are the
MaxDropout paper's recipe: SGD (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4) and
MultiStepLR at epochs 60/120/160 with gamma 0.2, for 200 epochs.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from maxdrop.models import ResNet18, WithSlots
from maxdrop.models.slots import positive_int
from maxdrop.models.with_slots import check_output_width
from maxdrop.training.resume_checks import check_schedule_length, check_state_dict_keys
from maxdrop.utils.class_paths import import_class_path
from maxdrop.utils.distributed import destroy_process_group_at_exit

RNG_KEY = "maxdrop_rng_states"


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # as plain types and tensors, so that checkpoints load with torch.load(weights_only=True)
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


__all__ = ["PAPER_LR_SCHEDULER", "PAPER_OPTIMIZER", "ClassificationModule", "ErrorRate"]

#: The paper's optimizer, as a config entry (what ``--print_config`` shows by default).
PAPER_OPTIMIZER: dict[str, Any] = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
}
#: The paper's LR schedule (stepped once per epoch), as a config entry.
PAPER_LR_SCHEDULER: dict[str, Any] = {
    "class_path": "torch.optim.lr_scheduler.MultiStepLR",
    "init_args": {"milestones": [60, 120, 160], "gamma": 0.2},
}


class ErrorRate(MulticlassAccuracy):
    """Top-k error rate in percent, as the paper reports it: ``100 * (1 - accuracy)``."""

    def compute(self) -> Tensor:
        return 100.0 * (1.0 - super().compute())


def _from_spec(spec: Any, what: str) -> Callable[..., Any]:
    """A ``{"class_path", "init_args"}`` entry -> a partial of that class; callables pass through."""
    if not isinstance(spec, dict):
        return spec
    if "class_path" not in spec:
        raise ValueError(f"{what} must be a callable or a dict with a class_path (and init_args), got {spec!r}")
    try:
        cls = import_class_path(spec["class_path"])
    except ImportError as err:
        reason = err.__cause__ or err
        raise ValueError(f"{what}: cannot import class_path {spec['class_path']!r} ({reason})") from err
    return partial(cls, **spec.get("init_args", {}))


class BackboneFactory(Protocol):
    """What ``backbone`` is: builds the network from the data's class count, ``factory(num_classes=...)``.

    A protocol rather than ``Callable[[int], nn.Module]``: jsonargparse then leaves out the class's
    ``num_classes`` parameter *by name*, so any backbone class with that keyword parses into a namespace,
    WithSlots (whose first parameter is ``model``) included, and one argument of it can be overridden
    on the command line (``--model.init_args.backbone.init_args.slots={}``: no layers).
    """

    def __call__(self, num_classes: int) -> nn.Module: ...


def _factory_class(factory: Callable[..., Any]) -> type | None:
    """The class that a factory (a class, a partial of one, or jsonargparse's partial) builds, if known."""
    if inspect.isclass(factory):
        return factory
    if isinstance(factory, partial):
        # jsonargparse's factories are partial(wrapper, instantiator, cls, **init_args).
        return next((a for a in (factory.func, *factory.args) if inspect.isclass(a)), None)
    return None


def _phases_of_a_short_run(cls: type, given: dict[str, Any], total: int) -> dict[str, Any]:
    """A ``pct_start`` that gives each phase of a one-cycle schedule (``OneCycleLR``) at least one step.

    OneCycleLR's warm-up ends at step ``pct_start * total - 1``; a run so short that this is 0 (e.g. 4 steps
    at pct_start 0.25) divides by a phase of zero steps. The warm-up is then lengthened to 2 steps, which
    keeps the schedule's shape as far as the run allows. Returns ``{}`` when nothing needs to change.

    Raises:
        ValueError: the run has too few steps for the phases (under 3, or 4 with ``three_phase``).
    """
    params = inspect.signature(cls).parameters
    if "pct_start" not in params:
        return {}
    pct_start = float(given.get("pct_start", params["pct_start"].default))
    three_phase = bool(given.get("three_phase", params["three_phase"].default if "three_phase" in params else False))
    if pct_start * total >= 2:
        return {}
    needed = 4 if three_phase else 3
    if total < needed:
        raise ValueError(
            f"{cls.__name__} cannot be built for a run of {total} optimizer step(s): each of its "
            f"{3 if three_phase else 2} phases needs at least one step, so it needs {needed} or more. Train longer "
            "(--trainer.max_epochs, --trainer.limit_train_batches, --trainer.max_steps) or use a constant learning "
            "rate (--model.init_args.lr_scheduler null)"
        )
    rank_zero_info(
        f"{cls.__name__}: pct_start {pct_start:g} leaves no warm-up step in this run of {total} steps; "
        f"using pct_start {2 / total:g} (2 warm-up steps)"
    )
    return {"pct_start": 2 / total}


def _build_backbone(factory: Callable[..., nn.Module], num_classes: int) -> nn.Module:
    """``factory(num_classes=...)`` (by keyword: torchvision's first argument is ``weights``), or
    ``factory(num_classes)`` for a callable whose first parameter has another name (``lambda n: ...``),
    checked to give ``num_classes`` logits."""
    given = isinstance(factory, partial) and factory.keywords.get("num_classes") is not None  # in the config
    how = "none" if given else _num_classes_parameter(_factory_class(factory) or factory)
    if how == "keyword":
        built = factory(num_classes=num_classes)
    else:
        built = factory(num_classes) if how == "positional" else factory()
    if not isinstance(built, nn.Module):
        raise TypeError(f"backbone must build an nn.Module, got {type(built).__name__}")
    if not isinstance(built, WithSlots):  # WithSlots checks its own width, at its input_size
        # A model for another input size fails the dry forward: then the first batch will tell.
        example = torch.zeros(2, 3, 32, 32)
        check_output_width(built, num_classes, example, f"the backbone {type(built).__name__}", strict=False)
    return built


def _num_classes_parameter(fn: Callable[..., Any]) -> str:
    """How ``fn`` takes the number of classes: "keyword" (a ``num_classes`` or ``**kwargs`` parameter),
    "positional" (a required first positional parameter of another name) or "none"."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return "positional"  # a callable without a signature: the old contract, backbone(num_classes)
    if any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return "keyword"
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if params and params[0].kind in positional and params[0].default is inspect.Parameter.empty:
        return "positional"
    return "none"


class ClassificationModule(LightningModule):
    """Image classifier: ``backbone(num_classes=...)`` trained with (label-smoothed) cross-entropy.

    Logged (``acc`` as a fraction in [0, 1], ``error`` in percent = 100 (1 - acc)):
    ``train/loss`` (per step and epoch), ``train/acc``, ``train/error``, ``val/loss``,
    ``val/acc``, ``val/error``, ``test/loss``, ``test/acc``, ``test/error``; with 100 classes
    or more also ``{stage}/acc_top5`` and ``{stage}/error_top5``. At test time also ``test/ece``
    (expected calibration error of the softmax confidence, 15 equal-width bins, L1, a fraction) and
    ``test/nll`` (mean negative log-likelihood of the true class, without label smoothing).

    Args:
        backbone: builds the network from the number of classes: a backbone class such as
            :class:`maxdrop.models.ResNet18`, a ``functools.partial`` of one (e.g. with
            ``slots=...``), or in YAML a ``class_path``/``init_args`` entry without
            ``num_classes``; ``num_classes`` is passed by keyword where the callable accepts it. Any other
            classifier: :class:`maxdrop.models.WithSlots` (with maxdrop layers at named positions), or a
            built ``nn.Module`` (a ``class_path`` of a factory function such as
            ``torchvision.models.resnet18`` with ``init_args: {num_classes: ...}``). The network maps
            (N, 3, H, W) images to (N, num_classes) logits; a dry forward at 3x32x32 refuses one with
            another output width.
        num_classes: number of classes; the CLI links it from the datamodule.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        optimizer: builds the optimizer from the parameters (default: the paper's SGD).
        lr_scheduler: builds the LR scheduler from the optimizer, or ``None`` for a constant
            LR (default: the paper's MultiStepLR). A scheduler class that takes
            ``total_steps`` (such as ``OneCycleLR``) and is given none gets the run's total
            number of optimizer steps, and is then stepped every step.
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps; ``None``
            picks ``"step"`` for schedulers that got ``total_steps`` and ``"epoch"`` otherwise.
        channels_last: keep the backbone's weights and the batches in channels-last memory
            format (faster convolutions on GPUs with tensor cores, and with bf16/fp16).
        compile: ``torch.compile`` the backbone when fit/validate/test/predict starts, i.e. after
            the strategy (e.g. DDP) has wrapped the model. The compiled module is kept outside
            the module tree, so checkpoints hold plain ``backbone.*`` keys (no ``_orig_mod.``)
            and load into an uncompiled model.
        compile_kwargs: arguments of ``torch.compile`` (e.g. ``{mode: max-autotune}``,
            ``{backend: aot_eager}``); used when ``compile`` is on.

    Raises:
        ValueError: bad ``num_classes``, ``label_smoothing`` or ``lr_scheduler_interval``; data
            with another number of classes (checked at setup); a checkpoint whose tensors do not
            fit the model, e.g. one trained for another number of classes (checked on load).
        TypeError: ``backbone`` builds something other than an ``nn.Module``.
    """

    def __init__(
        self,
        backbone: BackboneFactory | dict[str, Any] = ResNet18,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = PAPER_OPTIMIZER,
        lr_scheduler: LRSchedulerCallable | None = PAPER_LR_SCHEDULER,
        lr_scheduler_interval: Literal["epoch", "step"] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = bool(channels_last)
        self.compile_backbone = bool(compile)  # not `self.compile`: that is nn.Module.compile()
        self.compile_kwargs = dict(compile_kwargs or {})
        self.num_classes = positive_int("num_classes", num_classes)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if lr_scheduler_interval not in (None, "epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch', 'step' or None, got {lr_scheduler_interval!r}")
        # Under LightningCLI this records the parsed config (class_path/init_args entries), from which
        # load_from_checkpoint rebuilds the same model, slots included.
        # An nn.Module given in Python is kept out of the hyperparameters (Lightning's advice): then
        # load_from_checkpoint needs backbone=... again. From the CLI the config entry is recorded.
        instance = isinstance(backbone, nn.Module) and _given_hyperparameters.get() is None
        self.save_hyperparameters(ignore=["backbone"] if instance else None)
        self.label_smoothing = float(label_smoothing)
        self.optimizer_factory = _from_spec(optimizer, "optimizer")
        self.lr_scheduler_factory = _from_spec(lr_scheduler, "lr_scheduler")
        self.lr_scheduler_interval = lr_scheduler_interval
        if isinstance(backbone, nn.Module):
            # A built network (LightningCLI calls a factory function such as torchvision.models.resnet18
            # itself): used as it is; only its width can be checked.
            example = torch.zeros(2, 3, 32, 32)
            check_output_width(backbone, num_classes, example, f"the backbone {type(backbone).__name__}", strict=False)
            self.backbone = backbone
        else:
            self.backbone = _build_backbone(_from_spec(backbone, "backbone"), num_classes)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", self._metrics(stage))
        self.test_ece = MulticlassCalibrationError(self.num_classes, n_bins=15, norm="l1")

    def _metrics(self, stage: str) -> MetricCollection:
        n = self.num_classes
        metrics = {"acc": MulticlassAccuracy(n, average="micro"), "error": ErrorRate(n, average="micro")}
        if n >= 100:
            metrics["acc_top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
            metrics["error_top5"] = ErrorRate(n, top_k=5, average="micro")
        return MetricCollection(metrics, prefix=f"{stage}/")

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        """(N, 3, H, W) images -> (N, num_classes) logits.

        ``targets`` ((N,) labels) go to the backbone only when it declares ``needs_targets`` (a head
        layer such as ProbGuidedMaxout); ``training_step`` passes them, no other step does.
        """
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self.__dict__.get("_compiled_backbone")
        backbone = self.backbone if compiled is None else compiled
        if targets is not None and getattr(self.backbone, "needs_targets", False):
            return backbone(x, targets)
        return backbone(x)

    def _prepare_fast_paths(self) -> None:
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if self.compile_backbone and "_compiled_backbone" not in self.__dict__:
            # Stored in __dict__, not as a submodule: the state_dict keeps plain backbone.* keys.
            self.__dict__["_compiled_backbone"] = torch.compile(self.backbone, **self.compile_kwargs)

    def on_fit_start(self) -> None:
        self._prepare_fast_paths()

    def on_validation_start(self) -> None:
        self._prepare_fast_paths()

    def on_test_start(self) -> None:
        self._prepare_fast_paths()

    def on_predict_start(self) -> None:
        self._prepare_fast_paths()

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        dm = self.trainer.datamodule if self._trainer is not None else None
        data_classes = getattr(dm, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the model has num_classes={self.num_classes} but the data has {data_classes} classes "
                f"({type(dm).__name__}); use a model built for {data_classes} classes"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Random layers (nn.Dropout, DropBlock2d, ...) draw from the global generators: saving them makes a
        # resumed fit bitwise equal to a straight one. (Data order and augmentation have their own seeds.)
        checkpoint[RNG_KEY] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        if RNG_KEY in checkpoint and resuming:
            _set_rng_states(checkpoint[RNG_KEY])  # resuming a fit; plain loading leaves the generators alone
        # configure_optimizers (after this hook) checks that the schedule can continue.
        self._resumed_lr_schedulers = checkpoint.get("lr_schedulers") if resuming else None
        own = self.state_dict()
        if self.strict_loading:
            check_state_dict_keys(checkpoint, own, self.hparams.get("backbone"))
        differ = [
            f"{k} is {tuple(v.shape)} there and {tuple(own[k].shape)} here"
            for k, v in checkpoint.get("state_dict", {}).items()
            if k in own and v.shape != own[k].shape
        ]
        if differ:
            trained = checkpoint.get("hyper_parameters", {}).get("num_classes")
            why = (
                f"it was trained for {trained} classes and this model has num_classes={self.num_classes}"
                if trained not in (None, self.num_classes)
                else f"was it trained for another number of classes than {self.num_classes} or another backbone?"
            )
            raise ValueError(f"the checkpoint does not fit this model ({'; '.join(differ[:2])}): {why}")

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        logits = self(x, y if stage == "train" else None)  # labels never reach eval predictions
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits.detach(), y)
        train = stage == "train"
        # Epoch losses of val/test are averaged over all DDP ranks (one all-reduce per epoch).
        self.log(
            f"{stage}/loss", loss, on_step=train, on_epoch=True, prog_bar=True, sync_dist=not train, batch_size=len(x)
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=not train, batch_size=len(x))
        if stage == "test":
            self._log_fit_quality(logits.detach(), y)
        return loss

    def _log_fit_quality(self, logits: Tensor, y: Tensor) -> None:
        # Probabilities, not logits: torchmetrics would take logits that happen to lie in [0, 1] for probabilities.
        self.test_ece.update(logits.softmax(dim=1), y)
        self.log("test/ece", self.test_ece, on_step=False, on_epoch=True, batch_size=len(y))
        nll = F.cross_entropy(logits, y)
        self.log("test/nll", nll, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(y))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One optimizer step on a batch ((N, 3, H, W) images, (N,) int64 labels); returns the loss."""
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> dict[str, Tensor]:
        """Predictions for a batch of images (or an (images, labels) batch; the labels are ignored).

        Returns:
            ``{"preds": (N,) int64 class indices, "probs": (N, num_classes) softmax probabilities}``.
        """
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(x).softmax(dim=1)
        return {"preds": probs.argmax(dim=1), "probs": probs}

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        interval = self.lr_scheduler_interval
        cls = _factory_class(self.lr_scheduler_factory)
        given = getattr(self.lr_scheduler_factory, "keywords", {})
        if cls is not None and "total_steps" in inspect.signature(cls).parameters and given.get("total_steps") is None:
            total = int(self.trainer.estimated_stepping_batches)
            check_schedule_length(getattr(self, "_resumed_lr_schedulers", None), total, self.trainer)
            scheduler = self.lr_scheduler_factory(
                optimizer, total_steps=total, **_phases_of_a_short_run(cls, given, total)
            )
            interval = interval or "step"
        else:
            scheduler = self.lr_scheduler_factory(optimizer)
        config = {"scheduler": scheduler, "interval": interval or "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/error"
        return {"optimizer": optimizer, "lr_scheduler": config}
