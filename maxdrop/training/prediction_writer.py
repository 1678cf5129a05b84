"""``maxdrop predict``'s output: the predicted classes and probabilities, saved in the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from maxdrop.utils.atomic import atomic_save

__all__ = ["PredictionWriter"]


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
        atomic_save(out, path)
        rank_zero_info(f"predictions of {len(out['preds'])} images saved to {path}")
