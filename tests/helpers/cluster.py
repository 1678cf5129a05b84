"""Callbacks that the cluster tests load by class_path into real `maxdrop fit` processes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl


class ShardRecorder(pl.Callback):
    """Writes the ids of the training images this rank saw, per epoch, to ``$SHARD_DIR/rank<r>.json``.

    The tests' images carry their id in the first pixel of channels 0 and 1 (``data_helpers.make_images``);
    run with ``augment: {crop_padding: 0, hflip: false, normalize: false}`` so that pixels arrive unchanged.
    """

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch[0]
        ids = (x[:, 0, 0, 0] * 255).round().long() + 256 * (x[:, 1, 0, 0] * 255).round().long()
        self.seen.setdefault(trainer.current_epoch, []).extend(ids.tolist())

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(os.environ["SHARD_DIR"]) / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"world_size": trainer.world_size, "seen": self.seen}))


class SlowTraining(pl.Callback):
    """Sleeps after each step and announces each rank's pid, so a test can kill a rank mid-training."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(os.environ["SHARD_DIR"], f"alive{trainer.global_rank}").write_text(str(os.getpid()))
        time.sleep(0.2)
