"""Training-step throughput, each comparison side by side in one process (interleaved repeats).

    python benchmarks/train.py [--steps 12] [--repeats 3] [--device cpu|cuda] [--precision 32-true|bf16-mixed]

1. A plain PyTorch loop against maxdrop through Lightning (ClassificationModule + Trainer): same
   model (the quickstart FastCNN with MaxDropout), same batches, same optimizer. Target: Lightning
   at most 5% slower.
2. ResNet-18 with MaxDropout in all four stage slots against ResNet-18 without dropout (plain loop).
   Target: at most 3% slower.
3. Lightning with and without the SparsityMonitor callback (quickstart model). Target: at most 5%.

Images/s are medians over the repeats; ratios are slow/fast variants of the same repeat.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from maxdrop import MaxDropout
from maxdrop.callbacks import SparsityMonitor
from maxdrop.models import FastCNN, ResNet18
from maxdrop.module import ClassificationModule

sys.path.insert(0, str(Path(__file__).parent))
from _load import load_line  # noqa: E402

MAXDROP = functools.partial(MaxDropout, p=0.3)


def quickstart_backbone():
    return functools.partial(FastCNN, widths=[16, 32, 64, 128], slots={f"stage{i}": MAXDROP for i in (1, 2, 3)})


def make_batches(n: int, batch: int, device: str, num_classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(batch, 3, 32, 32, generator=g).to(device),
            torch.randint(0, num_classes, (batch,), generator=g).to(device),
        )
        for _ in range(n)
    ]


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_loop(backbone_factory, batches, warmup: int, device: str, precision: str) -> float:
    """Images/s of forward + cross-entropy + backward + SGD step, timed after ``warmup`` steps."""
    torch.manual_seed(0)
    model = backbone_factory(10).to(device).train()
    opt = sgd(model.parameters())
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return (len(batches) - warmup) * len(batches[0][1]) / (time.perf_counter() - t0)


class _Batches:
    """An iterable of ready batches (a plain list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Timer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(str(pl_module.device))
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        _sync(str(pl_module.device))
        self.t1 = time.perf_counter()


def lightning_loop(backbone_factory, batches, warmup: int, device: str, precision: str, callbacks=()) -> float:
    """Images/s of the same steps through ClassificationModule and the Lightning Trainer."""
    torch.manual_seed(0)
    module = ClassificationModule(backbone=backbone_factory, num_classes=10, optimizer=sgd, lr_scheduler=None)
    timer = _Timer(warmup)
    trainer = pl.Trainer(
        accelerator="gpu" if device.startswith("cuda") else "cpu",
        devices=1,
        precision=precision,
        max_epochs=1,
        logger=pl.loggers.CSVLogger("/tmp/maxdrop-bench-logs") if callbacks else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer, *callbacks],
    )
    trainer.fit(module, train_dataloaders=_Batches(batches))
    return (len(batches) - warmup) * len(batches[0][1]) / (timer.t1 - timer.t0)


def compare(name: str, fast, slow, repeats: int, target: float) -> None:
    """Interleaved repeats; 'slower by' is the median over repeats of (fast images/s / slow images/s) - 1."""
    fast_ips, slow_ips = [], []
    for _ in range(repeats):
        fast_ips.append(fast())
        slow_ips.append(slow())
    ratios = sorted(f / s for f, s in zip(fast_ips, slow_ips, strict=True))
    ratio = statistics.median(ratios)
    verdict = "meets" if ratio <= 1 + target else "MISSES"
    print(
        f"{name:<58} {statistics.median(fast_ips):>9.1f} {statistics.median(slow_ips):>9.1f} "
        f"{(ratio - 1) * 100:>+8.1f}%   ({verdict} <= {target * 100:.0f}%; per repeat: "
        + ", ".join(f"{(r - 1) * 100:+.1f}%" for r in ratios)
        + ")",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="batch of the quickstart model")
    parser.add_argument("--resnet-batch", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--only", choices=["lightning", "resnet", "monitor"], help="run one comparison")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: PyTorch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; lightning {pl.__version__}; precision {args.precision}")
    print(load_line("at the start"))
    print(f"{'comparison (images/s: fast variant, slow variant)':<58} {'fast':>9} {'slow':>9} {'slower by':>9}")
    n = args.warmup + args.steps
    quick = make_batches(n, args.batch, dev)
    run = lambda which: args.only in (None, which)  # noqa: E731
    if run("lightning"):
        compare(
            f"plain PyTorch loop vs Lightning (FastCNN+MaxDropout, b{args.batch})",
            lambda: plain_loop(quickstart_backbone(), quick, args.warmup, dev, args.precision),
            lambda: lightning_loop(quickstart_backbone(), quick, args.warmup, dev, args.precision),
            args.repeats,
            0.05,
        )
    if run("resnet"):
        res = make_batches(n, args.resnet_batch, dev)
        with_md = functools.partial(ResNet18, slots={f"stage{i}": MAXDROP for i in (1, 2, 3, 4)})
        compare(
            f"ResNet-18: no dropout vs MaxDropout in stage1-4 (b{args.resnet_batch})",
            lambda: plain_loop(ResNet18, res, args.warmup, dev, args.precision),
            lambda: plain_loop(with_md, res, args.warmup, dev, args.precision),
            args.repeats,
            0.03,
        )
    if run("monitor"):
        compare(
            f"Lightning without vs with SparsityMonitor (FastCNN, b{args.batch})",
            lambda: lightning_loop(quickstart_backbone(), quick, args.warmup, dev, args.precision),
            lambda: lightning_loop(quickstart_backbone(), quick, args.warmup, dev, args.precision, [SparsityMonitor()]),
            args.repeats,
            0.05,
        )


if __name__ == "__main__":
    main()
