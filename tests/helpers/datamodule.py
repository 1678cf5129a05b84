"""Building CIFARDataModules and trainers for the data tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import torch

from maxdrop.data import CIFARDataModule
from tests.helpers.data import (
    official_batches,
)


def dm_for(path: Path, tmp_path: Path, **kw) -> CIFARDataModule:
    kw.setdefault("val_size", 0)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return CIFARDataModule(data_dir=str(path), **kw)


def official_expected(dataset: str, n_train: int, n_test: int) -> tuple[np.ndarray, ...]:
    files = official_batches(dataset, n_train, n_test)
    key = b"labels" if dataset == "cifar10" else b"fine_labels"
    train = ["train"] if dataset == "cifar100" else [f"data_batch_{i}" for i in range(1, 6)]
    test = "test" if dataset == "cifar100" else "test_batch"
    tx = np.concatenate([files[f][b"data"] for f in train]).reshape(-1, 3, 32, 32)
    ty = np.concatenate([files[f][key] for f in train])
    return tx, ty, files[test][b"data"].reshape(-1, 3, 32, 32), np.asarray(files[test][key])


def fake_trainer(rank: int = 0, world: int = 1, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(
        global_rank=rank,
        world_size=world,
        current_epoch=epoch,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
    )


def quiet_trainer(tmp_path: Path, **kw) -> pl.Trainer:
    """A CPU Trainer without logger, progress bar or summary (checkpointing only when callbacks are given)."""
    kw.setdefault("enable_checkpointing", bool(kw.get("callbacks")))
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )
