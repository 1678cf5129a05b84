"""Tiny models, trainers and event-file readers for the monitoring tests.

``TinyBackbone``/``TinyModule``: a two-conv model whose slots (``default_slots``) cover a maxdrop layer and
layers the monitor counts with hooks; ``Recording`` counts what every slot saw with its own hooks,
independently of the monitor (``RecordedClassifier``: the project's module with those counts);
``read_events``/``images_of``: what a run wrote to TensorBoard."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import DropBlock2d

from maxdrop import MaxDropout, MaxDropoutV2
from maxdrop.callbacks import SparsityMonitor
from maxdrop.module import ClassificationModule
from maxdrop.monitoring.drop_masks import TAG
from tests.helpers.references import authors_dropped, v2_dropped

SLOT_NAMES = ("stage1", "stage2", "head")
CHANNELS = {"stage1": 4, "stage2": 6, "head": 6}


def default_slots() -> dict[str, nn.Module]:
    """A maxdrop layer (counts its own drops), a 4-D and a 2-D layer counted by hooks."""
    return {"stage1": MaxDropout(0.5), "stage2": DropBlock2d(0.3, block_size=3), "head": nn.Dropout(0.5)}


class TinyBackbone(nn.Module):
    """conv -> ReLU -> stage1 -> conv -> ReLU -> stage2 -> mean pool -> head -> aux -> linear.

    ``aux`` (empty unless given) is skipped when ``skip_aux``: a slot that one DDP rank never runs.
    """

    def __init__(self, slots: dict[str, nn.Module] | None = None, skip_aux: bool = False) -> None:
        super().__init__()
        slots = default_slots() if slots is None else slots
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.stage1 = slots.get("stage1", nn.Identity())
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.stage2 = slots.get("stage2", nn.Identity())
        self.head = slots.get("head", nn.Identity())
        self.aux = slots.get("aux", nn.Identity())
        self.fc = nn.Linear(6, 10)
        self.skip_aux = skip_aux

    def dropout_slots(self) -> dict[str, nn.Module]:
        names = (*SLOT_NAMES, "aux")
        return {n: getattr(self, n) for n in names if not isinstance(getattr(self, n), nn.Identity)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.conv1(x).relu())
        x = self.head(self.stage2(self.conv2(x).relu()).mean((2, 3)))
        return self.fc(x if self.skip_aux else self.aux(x))


class Recording:
    """LightningModule mixin: counts what every slot of ``self.backbone`` saw, per (phase, epoch, slot),
    with its own forward hooks, independently of the monitor."""

    def install_recorder(self) -> None:
        self.counts: dict[tuple[str, int, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.per_channel: dict[tuple[int, str], torch.Tensor] = {}
        self._phase: str | None = None
        for name, layer in self.backbone.dropout_slots().items():
            layer.register_forward_hook(self._make_hook(name))

    def _make_hook(self, name: str):
        def hook(layer: nn.Module, args: tuple, y: torch.Tensor) -> None:
            if self._phase is None:
                return
            x = args[0].detach()
            c = self.counts[(self._phase, self.current_epoch, name)]
            shut = (x != 0) & (y == 0)
            if self._phase == "train" and type(layer) is MaxDropout:
                c["dropped"] += authors_dropped(x, layer.p)
            elif self._phase == "train" and type(layer) is MaxDropoutV2:
                c["dropped"] += v2_dropped(x, layer.p)
            else:
                c["dropped"] += int(shut.sum())
            c["seen"] += x.numel()
            c["zero_in"] += int((x == 0).sum())
            c["zero_out"] += int((y == 0).sum())
            c["numel"] += x.numel()
            if self._phase == "train" and x.ndim >= 2:
                dims = [d for d in range(x.ndim) if d != 1]
                key, per = (self.current_epoch, name), shut.sum(dims)
                prev = self.per_channel.get(key)
                if prev is None or prev.shape == per.shape:  # a slot may change its channel count
                    self.per_channel[key] = per if prev is None else prev + per

        return hook

    def training_step(self, batch, batch_idx):
        self._phase = "train"
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._phase = None

    def validation_step(self, batch, batch_idx):
        self._phase = None if self.trainer.sanity_checking else "val"
        try:
            return super().validation_step(batch, batch_idx)
        finally:
            self._phase = None


class _Tiny(pl.LightningModule):
    def __init__(self, backbone: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = TinyBackbone() if backbone is None else backbone

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.backbone(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.backbone(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class TinyModule(Recording, _Tiny):
    """The tiny model; with ``record``, independent counts of every slot (see :class:`Recording`)."""

    def __init__(self, backbone: nn.Module | None = None, record: bool = True) -> None:
        super().__init__(backbone)
        if record and hasattr(self.backbone, "dropout_slots"):
            self.install_recorder()
        else:
            self._phase = None


class RecordedClassifier(Recording, ClassificationModule):
    """The project's LightningModule, with independent counts of every slot."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.install_recorder()


def make_trainer(root: Path, monitor: SparsityMonitor | None, epochs: int = 2, **kw) -> pl.Trainer:
    """A one-CPU Trainer with ``monitor`` (if any) logging to TensorBoard under ``root/version_0``."""
    kw.setdefault("logger", TensorBoardLogger(root, name="", version=0))
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=[] if monitor is None else [monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


def images(n: int, seed: int) -> DataLoader:
    """``n`` random 32x32 RGB images with labels 0-9, in batches of 4."""
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=4)


def read_events(run: Path):
    """The scalars and histograms of a run folder's TensorBoard event files (an EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def images_of(run: Path) -> dict[str, list[tuple[int, bytes, str]]]:
    """``{tag: [(step, PNG, description)]}`` of the drop-mask images in a run folder's event files."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.startswith(TAG + "/"):
            desc = acc.SummaryMetadata(tag).summary_description
            out[tag] = [(e.step, e.tensor_proto.string_val[2], desc) for e in acc.Tensors(tag)]
    return out
