"""Cost of SparsityMonitor on the quickstart training step, with and without it, in one process.

    python benchmarks/monitoring.py [--config configs/quickstart.yaml] [--pairs 30] [--slots stages]

The model, optimizer, LR schedule, batch size and thread count come from the config (by default the
quickstart: FastCNN (16, 32, 64, 128) with MaxDropout(0.3) after each of its 3 stages, batch 256, one
thread); the input is CIFAR-shaped random float32 data already in memory, so the step is the model's
alone (no data loading, the strictest case for the ratio). ``--slots stages+blocks`` also fills the
3 ``block`` slots (6 monitored slots).

One ``Trainer.fit`` runs 2 x ``pairs`` timed training steps that alternate between the monitor's
forward hooks registered and removed, so that the machine's noise hits both alike. Each step is
timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step,
callbacks). Prints the median step time of each variant, the ratio with / without (median over the
pairs of the ratio of their two steps, and the ratio of the medians), the time spent inside the
monitor's forward hooks per step (the added work itself, free of the other steps' noise), and the
monitor's end-of-epoch cost (all-reduce, logging, histograms, summary file) as a share of a CIFAR-10
epoch at that batch. Last, the cost of one ``DropMaskImages`` write (K = 8 images through a copy of the
backbone, one PNG grid per slot into TensorBoard), median of 5 writes, as a share of the same epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from maxdrop.callbacks import DropMaskImages, SparsityMonitor

sys.path.insert(0, str(Path(__file__).parent))
from _load import load_line  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_TRAIN = 50_000


class HookTimedMonitor(SparsityMonitor):
    """The monitor, adding up the time spent inside its forward hooks."""

    hook_seconds = 0.0

    def _timed(self, hook):
        def timed(*args):
            t0 = time.perf_counter()
            try:
                return hook(*args)
            finally:
                HookTimedMonitor.hook_seconds += time.perf_counter() - t0

        return timed

    def _make_pre_hook(self, name):
        return self._timed(super()._make_pre_hook(name))

    def _make_post_hook(self, name):
        return self._timed(super()._make_post_hook(name))


class Alternate(pl.Callback):
    """Registers the monitor's hooks on odd steps and removes them on even ones; times every step."""

    def __init__(self, monitor: SparsityMonitor) -> None:
        self.monitor = monitor
        self.times: dict[bool, list[float]] = {False: [], True: []}
        self.hook_times: list[float] = []
        self._on = False
        self._t0 = self._h0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._on = batch_idx % 2 == 1
        if self._on:
            self.monitor._attach(pl_module, final=True)
        else:
            self.monitor._detach()
        self._h0 = HookTimedMonitor.hook_seconds
        self._t0 = time.perf_counter()  # the monitor's own on_train_batch_start runs after this

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times[self._on].append(time.perf_counter() - self._t0)
        if self._on:
            self.hook_times.append(HookTimedMonitor.hook_seconds - self._h0)


@contextlib.contextmanager
def _timed(seconds: list[float]):
    """Append the block's wall time to ``seconds``."""
    t0 = time.perf_counter()
    yield
    seconds.append(time.perf_counter() - t0)


class EpochEndTimer(SparsityMonitor):
    """The monitor, timing its end-of-epoch work."""

    seconds: list[float] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        with _timed(self.seconds):
            super().on_train_epoch_end(trainer, pl_module)


class DropMaskTimer(DropMaskImages):
    """DropMaskImages writing after every epoch, timing each write."""

    seconds: list[float] = []

    def write(self, trainer, pl_module) -> None:
        with _timed(self.seconds):
            super().write(trainer, pl_module)


def build_model(config: dict, slots: str) -> pl.LightningModule:
    """The config's ``model`` entry, instantiated as LightningCLI would."""
    model = config["model"]
    if slots == "stages+blocks":
        backbone_slots = model["init_args"]["backbone"]["init_args"]["slots"]
        backbone_slots["block"] = dict(backbone_slots["stage1"])
    parser = ArgumentParser()
    parser.add_argument("--model", type=pl.LightningModule)
    torch.manual_seed(0)
    return parser.instantiate_classes(parser.parse_object({"model": model})).model


def fit(module: pl.LightningModule, data: DataLoader, steps: int, callbacks: list, root: str, epochs: int = 1) -> None:
    """``epochs`` of ``steps`` training steps; with more than one epoch one validation batch per epoch
    (so that the validation set, where DropMaskImages takes its images from, is loaded)."""
    pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_train_batches=steps,
        limit_val_batches=0 if epochs == 1 else 1,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(root, name=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, data, val_dataloaders=data)  # DropMaskImages picks its images from the validation set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--pairs", type=int, default=30, help="timed (without, with) step pairs")
    parser.add_argument("--slots", choices=("stages", "stages+blocks"), default="stages")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    config = yaml.safe_load(args.config.read_text())
    if config.get("num_threads"):
        torch.set_num_threads(config["num_threads"])
    batch = config["data"]["init_args"]["batch_size"]
    steps = 2 * (args.pairs + 1)  # the first pair warms up allocator and caches
    g = torch.Generator().manual_seed(0)
    n = batch * steps
    data = DataLoader(
        TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=batch,
    )
    with tempfile.TemporaryDirectory() as root:
        monitor = HookTimedMonitor()
        alternate = Alternate(monitor)
        module = build_model(config, args.slots)
        fit(module, data, steps, [alternate, monitor], root)
        fit(build_model(config, args.slots), data, 10, [EpochEndTimer()], root)
        images = DropMaskTimer(every_n_epochs=1)
        fit(build_model(config, args.slots), data, 1, [images], root, epochs=5)
        if images._off_reason is not None:
            raise SystemExit(f"DropMaskImages wrote nothing: {images._off_reason}")
    off, on = alternate.times[False][1:], alternate.times[True][1:]
    pair_ratios = [b / a for a, b in zip(off, on, strict=True)]
    med_off, med_on = statistics.median(off) * 1e3, statistics.median(on) * 1e3
    epoch_end = statistics.median(EpochEndTimer.seconds) * 1e3
    epoch_steps = -(-CIFAR10_TRAIN // batch)
    layers = ", ".join(f"{k}: {type(v).__name__}(p={v.p})" for k, v in module.backbone.dropout_slots().items())
    print(f"{args.config.name}: {type(module.backbone).__name__}, slots {layers}")
    print(
        f"batch {batch} float32 CPU, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"{len(off)} alternating step pairs"
    )
    print(load_line("at the end", includes_self=True))
    print(f"{'variant':<26} {'step ms (median)':>17}")
    print(f"{'without SparsityMonitor':<26} {med_off:>17.1f}")
    print(f"{'with SparsityMonitor':<26} {med_on:>17.1f}")
    q = statistics.quantiles(pair_ratios, n=4)
    print(
        f"ratio with / without: {statistics.median(pair_ratios):.3f} (median of pair ratios; quartiles "
        f"{q[0]:.3f} .. {q[2]:.3f}); ratio of medians {med_on / med_off:.3f}"
    )
    hooks = statistics.median(alternate.hook_times[1:]) * 1e3
    print(f"inside the monitor's forward hooks: {hooks:.1f} ms per step = {hooks / med_off * 100:.2f}% of the step")
    print(
        f"end of epoch (all-reduce, logging, histograms, summary file): {epoch_end:.1f} ms = "
        f"{epoch_end / (epoch_steps * med_off) * 100:.3f}% of a {epoch_steps}-step CIFAR-10 epoch"
    )

    write = statistics.median(DropMaskTimer.seconds) * 1e3
    print(
        f"one DropMaskImages write ({images.num_images} images, {len(images.skipped) or 'no'} slot skipped): "
        f"{write:.1f} ms = {write / (epoch_steps * med_off) * 100:.3f}% of a {epoch_steps}-step CIFAR-10 epoch "
        f"(median of {len(DropMaskTimer.seconds)} writes)"
    )


if __name__ == "__main__":
    main()
