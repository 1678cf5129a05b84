"""End-to-end training throughput of ResNet-18 + MaxDropout (stage1-4) on CIFAR-10, on one GPU.

    python benchmarks/gpu_resnet18.py --data PATH [--batch 512] [--epochs 4] [--no-compile]

The real pipeline: CIFARDataModule's tensor path with the dataset on the GPU and crop/flip done
batch-wise there, ClassificationModule with channels-last and torch.compile, bf16-mixed, cuDNN
autotuning. Images/s are counted over the epochs after the first (compilation and autotuning excluded).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from maxdrop import MaxDropout
from maxdrop.data import CIFARDataModule
from maxdrop.models import ResNet18
from maxdrop.module import ClassificationModule

sys.path.insert(0, str(Path(__file__).parent))
from _load import load_line  # noqa: E402


class Throughput(pl.Callback):
    def __init__(self) -> None:
        self.images, self.start = 0, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch >= 1:
            self.images += len(batch[1])

    def on_train_end(self, trainer, pl_module):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-maxdropout", action="store_true")
    args = parser.parse_args()
    slots = None if args.no_maxdropout else {f"stage{i}": functools.partial(MaxDropout, p=0.3) for i in (1, 2, 3, 4)}
    module = ClassificationModule(
        backbone=functools.partial(ResNet18, slots=slots),
        channels_last=True,
        compile=not args.no_compile,
        lr_scheduler=None,
    )
    dm = CIFARDataModule(data_dir=args.data, batch_size=args.batch, val_size=0, data_on_device=True)
    meter = Throughput()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        benchmark=True,
        max_epochs=args.epochs,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[meter],
    )
    trainer.fit(module, datamodule=dm)
    print(
        f"{torch.cuda.get_device_name()}: ResNet-18{'' if args.no_maxdropout else ' + MaxDropout stage1-4'}, "
        f"bf16, batch {args.batch}, compile={not args.no_compile}: "
        f"{meter.images / meter.seconds:,.0f} images/s over epochs 2-{args.epochs}"
    )
    print(load_line("at the end", includes_self=True))


if __name__ == "__main__":
    main()
