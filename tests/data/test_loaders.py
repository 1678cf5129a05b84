"""The tensor loader: batches that depend on seed and epoch only, DDP shards, raw batches."""

from __future__ import annotations

import math

import pytest
import torch

from maxdrop.data import CIFARDataModule, RawBatch
from maxdrop.data.cifar import TensorLoader
from tests.helpers.data import (
    write_official_dir,
)
from tests.helpers.datamodule import dm_for, fake_trainer

# --------------------------------------------------------------------------- tensor loader: determinism, DDP


def batches(dm: CIFARDataModule, loader: TensorLoader, rank=0, world=1, epoch=0) -> list[tuple[torch.Tensor, ...]]:
    dm.trainer = fake_trainer(rank, world, epoch)
    try:
        return [(b.images, b.labels, *dm.transform_batch(b)) for b in loader]
    finally:
        dm.trainer = None


def test_epoch_batches_depend_on_seed_and_epoch_only(tmp_path):
    folder = write_official_dir(tmp_path, n_train=100, n_test=20)
    kw = dict(batch_size=32, seed=5, augment={"cutout_holes": 1, "erasing_p": 0.5})
    dm = dm_for(folder, tmp_path, **kw)
    torch.manual_seed(0)
    e2 = batches(dm, dm.train_dataloader(), epoch=2)
    fresh = dm_for(folder, tmp_path, **kw)  # e.g. a run resumed at epoch 2
    torch.manual_seed(123)  # global RNG state must not matter
    e2_again = batches(fresh, fresh.train_dataloader(), epoch=2)
    e3 = batches(fresh, fresh.train_dataloader(), epoch=3)
    assert len(e2) == 4 and [len(b[1]) for b in e2] == [32, 32, 32, 4]
    for a, b in zip(e2, e2_again, strict=True):
        for t, u in zip(a, b, strict=True):
            assert torch.equal(t, u)
    assert not torch.equal(torch.cat([b[1] for b in e2]), torch.cat([b[1] for b in e3]))
    other_seed = dm_for(folder, tmp_path, **{**kw, "seed": 6})
    assert not torch.equal(batches(other_seed, other_seed.train_dataloader(), epoch=2)[0][2], e2[0][2])


@pytest.mark.parametrize(("n_train", "world"), [(100, 2), (101, 2), (3, 4)])
def test_ranks_cover_the_train_split_with_equal_batch_counts(tmp_path, n_train, world):
    folder = write_official_dir(tmp_path, n_train=n_train, n_test=21)
    dm = dm_for(folder, tmp_path, batch_size=16)
    loader = dm.train_dataloader()
    seen, counts = [], []
    for rank in range(world):
        bs = batches(dm, loader, rank, world, epoch=1)
        dm.trainer = fake_trainer(rank, world, 1)
        assert len(loader) == len(bs)
        dm.trainer = None
        counts.append(len(bs))
        assert sum(len(b[1]) for b in bs) == math.ceil(n_train / world)
        seen.append({bytes(img.numpy()) for b in bs for img in b[0]})
    assert set(counts) == {math.ceil(math.ceil(n_train / world) / 16)}
    assert set().union(*seen) == {bytes(img.numpy()) for img in dm.split("train")[0]}
    if n_train % world == 0:
        assert sum(len(s) for s in seen) == n_train  # exactly once when it divides


@pytest.mark.parametrize("n_test", [20, 21, 33])
def test_two_ranks_evaluate_every_test_image_exactly_once(tmp_path, n_test):
    folder = write_official_dir(tmp_path, n_train=20, n_test=n_test)
    dm = dm_for(folder, tmp_path, batch_size=8)
    loader = dm.test_dataloader()
    ids, counts = [], []
    for rank in (0, 1):
        bs = batches(dm, loader, rank, 2)
        counts.append(len(bs))
        ids += [bytes(img.numpy()) for b in bs for img in b[0]]
        assert all(b[0].shape[0] > 0 for b in bs)
    assert counts[0] == counts[1]
    assert sorted(ids) == sorted(bytes(img.numpy()) for img in dm.split("test")[0])


def test_raw_batches_are_uint8_and_carry_params_only_in_training(tmp_path):
    folder = write_official_dir(tmp_path, n_train=40, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=16)
    train = next(iter(dm.train_dataloader()))
    val = next(iter(dm.val_dataloader()))
    assert isinstance(train, RawBatch) and train.images.dtype == torch.uint8 and set(train.params) == {"crop", "flip"}
    assert val.params is None
