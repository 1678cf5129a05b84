"""Images per second of the CIFARDataModule's loading paths beside a small CNN's training step, in one process.

    python benchmarks/data.py [--data ../shared/data/cifar10-jpeg.tar.gz] [--batch-size 256] [--batches 40]

For each path the benchmark iterates ``--batches`` training batches of the real CIFAR-10 (including the
``on_after_batch_transfer`` augmentation + normalization that Lightning applies), and it times the
training step (forward, backward, SGD update) of a small 4-conv-layer CNN on batches of the same size.
Printed per path: images/s, and the ratio of the path's rate to the training step's rate (how many
times faster the data comes than the model consumes it; > 1 means the data path is not the limit),
plus the share of a step's time the data would take when run in the same process (tensor path, or
DataLoader with 0 workers). The decode cache must exist or is built first (seconds, once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from maxdrop.data import CIFARDataModule

sys.path.insert(0, str(Path(__file__).parent))
from _load import load_line  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def small_cnn(num_classes: int = 10) -> nn.Module:
    """4 conv layers (32-64-128-128 channels) with BN and ReLU, 3 max-pools, global pooling, a linear head."""

    def block(i: int, o: int, pool: bool) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)] + (
            [nn.MaxPool2d(2)] if pool else []
        )

    return nn.Sequential(
        *block(3, 32, False),
        *block(32, 64, True),
        *block(64, 128, True),
        *block(128, 128, True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def data_rate(dm: CIFARDataModule, batches: int) -> float:
    """Images/s of ``batches`` training batches of ``dm``, transform included; first batch = warm-up."""
    loader = dm.train_dataloader()
    it = iter(loader)
    dm.transform_batch(next(it))
    n, t0 = 0, time.perf_counter()
    for batch in islice(it, batches):
        x, _ = dm.transform_batch(batch)
        n += len(x)
    rate = n / (time.perf_counter() - t0)
    del it  # shuts DataLoader workers down
    return rate


def train_rate(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Images/s of forward + backward + SGD step on a fixed batch."""
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return steps * len(x) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="CIFAR-10 source (any form CIFARDataModule reads)")
    parser.add_argument("--cache-dir", default=None, help="decode cache folder (default: ~/.cache/maxdrop)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=40, help="batches per data-path measurement")
    parser.add_argument("--steps", type=int, default=8, help="training steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is printed")
    args = parser.parse_args()

    common = dict(data_dir=args.data, cache_dir=args.cache_dir, batch_size=args.batch_size, val_size=5000)
    heavy = {"cutout_holes": 1, "cutout_length": 16, "erasing_p": 0.5}
    paths = {
        "tensor: crop+flip": CIFARDataModule(loader="tensor", **common),
        "tensor: crop+flip+cutout+erasing": CIFARDataModule(loader="tensor", augment=heavy, **common),
        "dataloader 0 workers: crop+flip": CIFARDataModule(loader="dataloader", num_workers=0, **common),
        "dataloader 2 workers: crop+flip": CIFARDataModule(loader="dataloader", num_workers=2, **common),
        "dataloader 2 workers: +cutout+erasing": CIFARDataModule(
            loader="dataloader", num_workers=2, augment=heavy, **common
        ),
    }
    t0 = time.perf_counter()
    for dm in paths.values():
        dm.prepare_data()
        dm.setup("fit")
    print(f"prepare_data + setup of {len(paths)} datamodules: {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(0)
    model = small_cnn().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref = paths["tensor: crop+flip"]
    x, y = ref.transform_batch(next(iter(ref.train_dataloader())))
    train_rate(model, opt, x, y, 2)  # warm-up

    rates: dict[str, list[float]] = {name: [] for name in ["train step (small CNN)", *paths]}
    for _ in range(args.repeats):
        rates["train step (small CNN)"].append(train_rate(model, opt, x, y, args.steps))
        for name, dm in paths.items():
            rates[name].append(data_rate(dm, args.batches))
    med = {name: statistics.median(r) for name, r in rates.items()}
    step = med["train step (small CNN)"]

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch_size}, data {args.data}")
    print(load_line("at the end", includes_self=True))
    print(f"{'path':<40} {'images/s':>10} {'x train step':>13} {'data share of a step':>21}")
    print(f"{'train step (small CNN)':<40} {step:>10.0f} {1.0:>13.2f} {'':>21}")
    for name in paths:
        share = (1 / med[name]) / (1 / med[name] + 1 / step)
        in_process = "0 workers" in name or name.startswith("tensor")
        print(f"{name:<40} {med[name]:>10.0f} {med[name] / step:>13.2f} {f'{share:.1%}' if in_process else '-':>21}")


if __name__ == "__main__":
    main()
