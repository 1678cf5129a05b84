"""CIFARDataModule: sources, cache, split, augmentation, sharding, Lightning integration, the real data."""

from __future__ import annotations

import math
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

import maxdrop.data.cache as cache_mod
from maxdrop.data import AugmentConfig, CIFARDataModule, DataSourceError, RawBatch, apply_batch, sample_params
from maxdrop.data.augment import cutout_mask
from maxdrop.data.cifar import TensorLoader
from tests.helpers.data import (
    CIFAR10_CLASSES,
    expected_split,
    official_batches,
    tree_files,
    write_image_tarball,
    write_image_tree,
    write_official_archive,
    write_official_dir,
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


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "parent", "archive", "archive-parent"])
def test_official_layouts_decode_exactly(tmp_path, dataset, form):
    if form in ("folder", "parent"):
        folder = write_official_dir(tmp_path / "root", dataset, n_train=50, n_test=20)
        path = folder if form == "folder" else folder.parent
    else:
        name = "cifar-10-python.tar.gz" if dataset == "cifar10" else "cifar-100-python.tar.gz"
        archive = write_official_archive(tmp_path / "root" / name, dataset, n_train=50, n_test=20)
        path = archive if form == "archive" else archive.parent
    dm = dm_for(path, tmp_path, dataset=dataset)
    assert dm.num_classes == (10 if dataset == "cifar10" else 100)
    dm.setup("fit")
    tx, ty, sx, sy = official_expected(dataset, 50, 20)
    x, y = dm.split("train")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (50, 3, 32, 32)
    np.testing.assert_array_equal(x.numpy(), tx)
    np.testing.assert_array_equal(y.numpy(), ty)
    x, y = dm.split("test")
    np.testing.assert_array_equal(x.numpy(), sx)
    np.testing.assert_array_equal(y.numpy(), sy)
    if dataset == "cifar10":
        assert dm.classes == CIFAR10_CLASSES
    else:
        assert dm.classes[:2] == ["class000", "class001"] and len(dm.classes) == 100


@pytest.mark.parametrize("packed", [False, True])
def test_image_folder_tree_and_tarball(tmp_path, packed):
    classes = ["cat", "airplane", "dog"] + [f"z{i}" for i in range(7)]  # written unsorted on purpose
    files = tree_files(classes, {"train": 3, "test": 2})
    if packed:
        path = write_image_tarball(tmp_path / "imgs.tar.gz", files)
    else:
        path = write_image_tree(tmp_path / "imgs" / "cifar10-png", files).parent  # one folder below
    dm = dm_for(path, tmp_path)
    dm.setup("fit")
    assert dm.classes == sorted(classes)
    for split in ("train", "test"):
        want_x, want_y = expected_split(files, split)
        x, y = dm.split(split)
        np.testing.assert_array_equal(x.numpy(), want_x)  # PNG: lossless
        np.testing.assert_array_equal(y.numpy(), want_y)
        assert len(set(y[:6].tolist())) > 1  # stored in a mixed order, not class by class


def test_jpeg_tarball_decodes_close_to_the_pixels(tmp_path):
    files = tree_files(CIFAR10_CLASSES, {"train": 2, "test": 1}, fmt="JPEG")
    path = write_image_tarball(tmp_path / "c.tar.gz", files, fmt="JPEG")
    dm = dm_for(path, tmp_path)
    x, y = dm.split("train")
    want_x, want_y = expected_split(files, "train")
    np.testing.assert_array_equal(y.numpy(), want_y)
    assert np.abs(x.numpy().astype(int) - want_x).mean() < 12  # lossy, but the same picture


# --------------------------------------------------------------------------- bad input


def test_unknown_dataset_and_loader_and_sizes(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar1000'.*'cifar10', 'cifar100'"):
        CIFARDataModule(dataset="cifar1000")
    with pytest.raises(ValueError, match=r"unknown loader 'fast'.*'tensor', 'dataloader'"):
        CIFARDataModule(loader="fast")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        CIFARDataModule(batch_size=0)
    with pytest.raises(ValueError, match="seed must be null or an integer >= 0, got -1"):
        CIFARDataModule(seed=-1)
    folder = write_official_dir(tmp_path, n_train=50)
    with pytest.raises(ValueError, match="val_size=50 must be smaller than the train split"):
        dm_for(folder, tmp_path, val_size=50).setup()


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data_dir '.*nowhere' does not exist.*cifar-10-python.tar.gz"):
        dm_for(tmp_path / "nowhere", tmp_path).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"found no cifar10 data in folder '.*empty'"):
        dm_for(tmp_path / "empty", tmp_path).setup()


def test_wrong_archive_kind(tmp_path):
    not_tar = tmp_path / "data.zip"
    not_tar.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(DataSourceError, match=r"'.*data.zip' is not a tar archive"):
        dm_for(not_tar, tmp_path).setup()
    c100 = write_official_archive(tmp_path / "cifar-100-python.tar.gz", "cifar100", 10, 10)
    with pytest.raises(DataSourceError, match="holds cifar100, not cifar10; set dataset: cifar100"):
        dm_for(c100, tmp_path).setup()
    other = tmp_path / "other.tar.gz"
    with tarfile.open(other, "w:gz") as tf:
        tf.add(not_tar, arcname="stuff/readme.txt")
    with pytest.raises(DataSourceError, match=r"is not a cifar10 archive: expected the official"):
        dm_for(other, tmp_path).setup()


def test_truncated_archive(tmp_path):
    good = write_official_archive(tmp_path / "cifar-10-python.tar.gz", n_train=200, n_test=50)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataSourceError, match=r"'.*cut.tar.gz' is truncated or damaged"):
        dm_for(cut, tmp_path).setup()
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing cached from a damaged source


def test_train_test_class_mismatch(tmp_path):
    files = tree_files(CIFAR10_CLASSES, {"train": 1, "test": 1}, test_classes=[*CIFAR10_CLASSES[:9], "tractor"])
    with pytest.raises(
        DataSourceError, match=r"different classes \(only in train: \['truck'\], only in test: \['tractor'\]"
    ):
        dm_for(write_image_tarball(tmp_path / "m.tar.gz", files), tmp_path).setup()


def test_wrong_number_of_classes(tmp_path):
    files = tree_files(CIFAR10_CLASSES[:4], {"train": 1, "test": 1})
    with pytest.raises(DataSourceError, match="holds 4 classes, but the dataset has 10"):
        dm_for(write_image_tarball(tmp_path / "m.tar.gz", files), tmp_path).setup()


def test_unknown_or_bad_augment_key():
    with pytest.raises(ValueError, match=r"unknown augment key\(s\) \['cutout_size'\]; allowed: crop_padding, hflip"):
        CIFARDataModule(augment={"cutout_size": 8})
    with pytest.raises(ValueError, match=r"augment.erasing_p = 1.5 is invalid; allowed: a probability in \[0, 1\]"):
        CIFARDataModule(augment={"erasing_p": 1.5})
    with pytest.raises(ValueError, match="augment.crop_padding = -1 is invalid"):
        CIFARDataModule(augment={"crop_padding": -1})


# --------------------------------------------------------------------------- cache


def test_cache_is_reused_and_invalidated_when_the_source_changes(tmp_path, monkeypatch):
    archive = write_official_archive(tmp_path / "cifar-10-python.tar.gz", n_train=50, n_test=20, seed=0)
    first = dm_for(archive, tmp_path)
    first.setup()
    assert len(list((tmp_path / "cache").glob("cifar10-*.pt"))) == 1

    def no_decode(*a, **k):
        raise AssertionError("decoded again although a valid cache exists")

    monkeypatch.setattr(cache_mod, "decode_source", no_decode)
    again = dm_for(archive, tmp_path)
    again.setup()
    assert torch.equal(again.split("train")[1], first.split("train")[1])
    monkeypatch.undo()

    write_official_archive(archive, n_train=50, n_test=20, seed=1)  # same name and size class, new labels
    changed = dm_for(archive, tmp_path)
    changed.setup()
    assert not torch.equal(changed.split("train")[1], first.split("train")[1])
    np.testing.assert_array_equal(changed.split("train")[1].numpy(), official_expected_labels(seed=1))


def official_expected_labels(seed: int) -> np.ndarray:
    files = official_batches("cifar10", 50, 20, seed)
    return np.concatenate([files[f"data_batch_{i}"][b"labels"] for i in range(1, 6)])


def test_cache_of_an_image_tree_sees_a_changed_file(tmp_path):
    files = tree_files(CIFAR10_CLASSES, {"train": 1, "test": 1})
    root = write_image_tree(tmp_path / "tree", files)
    before = dm_for(root, tmp_path).split("train")[0].clone()
    img = root / "train" / "bird" / "0000.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 1_000_000))  # even on coarse clocks
    after = dm_for(root, tmp_path).split("train")[0]
    blank = [bool((imgs.flatten(1).amax(1) == 0).any()) for imgs in (before, after)]
    assert blank == [False, True]  # the new (black) image is served, not the stale cache


def test_interrupted_cache_write_leaves_nothing_trusted(tmp_path, monkeypatch):
    archive = write_official_archive(tmp_path / "cifar-10-python.tar.gz", n_train=50, n_test=20)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        dm_for(archive, tmp_path).setup()
    assert list((tmp_path / "cache").iterdir()) == []  # no final file, no temporary left
    monkeypatch.setattr(torch, "save", real_save)
    dm = dm_for(archive, tmp_path)
    dm.setup()
    (path,) = (tmp_path / "cache").glob("*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # a damaged cache (e.g. disk full) is rebuilt, not trusted
    again = dm_for(archive, tmp_path)
    again.setup()
    assert torch.equal(again.split("train")[0], dm.split("train")[0])


# --------------------------------------------------------------------------- split


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    folder = write_official_dir(tmp_path, n_train=100, n_test=20)
    a = dm_for(folder, tmp_path, val_size=30, split_seed=3)
    b = dm_for(folder, tmp_path, val_size=30, split_seed=3)
    c = dm_for(folder, tmp_path, val_size=30, split_seed=4)
    ids = {  # every test image is unique, so its bytes identify it
        name: {bytes(img.numpy()) for img in dm.split(split)[0]}
        for name, dm, split in (("a_val", a, "val"), ("a_train", a, "train"), ("b_val", b, "val"), ("c_val", c, "val"))
    }
    assert len(ids["a_val"]) == 30 and len(ids["a_train"]) == 70
    assert ids["a_val"].isdisjoint(ids["a_train"])
    assert ids["a_val"] == ids["b_val"] and ids["a_val"] != ids["c_val"]
    assert torch.equal(dm_for(folder, tmp_path, val_size=0).split("val")[0], a.split("test")[0])


def image_ids(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy()) for img in images}  # every synthetic image is unique


def test_train_per_class_is_a_stratified_fixed_subset_outside_the_val_split(tmp_path):
    folder = write_official_dir(tmp_path, n_train=400, n_test=20)
    a = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=5, seed=1)
    (tx, ty), (vx, _) = a.split("train"), a.split("val")
    assert torch.equal(torch.bincount(ty, minlength=10), torch.full((10,), 5))
    assert image_ids(tx).isdisjoint(image_ids(vx))
    full = dm_for(folder, tmp_path, val_size=50, split_seed=3)
    assert torch.equal(vx, full.split("val")[0])  # the validation split does not depend on the subset
    assert image_ids(tx) <= image_ids(full.split("train")[0])
    # The same images for every training seed (and rank, and resume: nothing else enters the draw) ...
    same = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=5, seed=2)
    assert torch.equal(same.split("train")[0], tx)
    # ... another subset_seed draws other images, and a smaller subset lies inside a larger one.
    other = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=5, subset_seed=1)
    assert image_ids(other.split("train")[0]) != image_ids(tx)
    larger = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=12, seed=1)
    assert image_ids(tx) < image_ids(larger.split("train")[0])
    assert a.hparams.train_per_class == 5 and a.hparams.subset_seed == 0  # saved in the run's config


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_train_per_class_is_a_clear_error(tmp_path, bad):
    with pytest.raises(ValueError, match=rf"train_per_class must be null or an integer >= 1, got {bad!r}"):
        dm_for(tmp_path, tmp_path, train_per_class=bad)


def test_train_per_class_above_the_smallest_class_names_the_limit(tmp_path):
    folder = write_official_dir(tmp_path, n_train=200, n_test=20)
    after_val = dm_for(folder, tmp_path, val_size=40).split("train")[1]
    counts = torch.bincount(after_val, minlength=10)
    limit, smallest = int(counts.min()), CIFAR10_CLASSES[int(counts.argmin())]
    assert dm_for(folder, tmp_path, val_size=40, train_per_class=limit).split("train")[0].shape[0] == 10 * limit
    dm = dm_for(folder, tmp_path, val_size=40, train_per_class=limit + 1)
    with pytest.raises(
        ValueError,
        match=rf"train_per_class={limit + 1} is more than the {limit} training images of "
        rf"class '{smallest}' after the 40-image validation split .* use at most {limit}",
    ):
        dm.setup()


# --------------------------------------------------------------------------- augmentation


def test_crop_and_flip_match_a_per_image_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    cfg = AugmentConfig(normalize=False)
    p = sample_params(cfg, 16, g)
    out = apply_batch(x, p, cfg, torch.zeros(3), torch.ones(3))
    for i in range(16):
        oy, ox = p["crop"][i].tolist()
        ref = torch.nn.functional.pad(x[i], (4, 4, 4, 4))[:, oy : oy + 32, ox : ox + 32]
        if p["flip"][i]:
            ref = ref.flip(-1)
        torch.testing.assert_close(out[i], ref.float() / 255)
    assert p["flip"].any() and not p["flip"].all()


def test_cutout_zeroes_the_clipped_square():
    centres = torch.tensor([[[16, 16]], [[0, 0]], [[31, 20]]])
    m = cutout_mask(centres, 16, (32, 32))
    assert m[0, 8:24, 8:24].all() and m[0].sum() == 256  # [c - 8, c + 8) x [c - 8, c + 8)
    assert m[1, 0:8, 0:8].all() and m[1].sum() == 64  # clipped at the corner
    assert m[2, 23:32, 12:28].all() and m[2].sum() == 9 * 16
    cfg = AugmentConfig(crop_padding=0, hflip=False, cutout_holes=1, cutout_length=16)
    x = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    out = apply_batch(x, {"cutout": centres}, cfg, torch.full((3,), 0.5), torch.full((3,), 0.25))
    assert torch.equal(out == 0, m[:, None].expand_as(out))  # zero (= the mean) exactly in the square


def test_random_erasing_rate_and_area():
    cfg = AugmentConfig(crop_padding=0, hflip=False, erasing_p=0.3)
    box = sample_params(cfg, 20000, torch.Generator().manual_seed(1))["erase"]
    erased = box[:, 2] > 0
    assert abs(erased.float().mean().item() - 0.3) < 0.015
    area = (box[erased, 2] * box[erased, 3]).float() / 1024
    assert area.min() >= 0.015 and area.max() <= 0.36 and abs(area.mean().item() - 0.175) < 0.03
    assert (box[erased, 0] + box[erased, 2] <= 32).all() and (box[erased, 1] + box[erased, 3] <= 32).all()
    x = torch.full((8, 3, 32, 32), 255, dtype=torch.uint8)
    out = apply_batch(
        x, {"erase": box[:8]}, AugmentConfig(erasing_p=0.3, erasing_value=-7.0), torch.zeros(3), torch.ones(3)
    )
    assert torch.equal((out == -7.0).sum((1, 2, 3)), 3 * box[:8, 2] * box[:8, 3])


def test_normalized_eval_batches_have_zero_mean_unit_std(tmp_path):
    folder = write_official_dir(tmp_path, n_train=200, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=1000)
    dm.setup()
    (batch,) = list(dm._loader("train", train=False))
    x, y = dm.transform_batch(batch)
    assert x.dtype == torch.float32 and x.shape == (200, 3, 32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-4, rtol=0)


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


# --------------------------------------------------------------------------- Lightning


class TinyNet(pl.LightningModule):
    """Records what each step receives."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        self.seen: dict[str, list[tuple]] = {"train": [], "val": [], "test": [], "predict": []}

    def _record(self, stage, batch):
        x, y = batch
        self.seen[stage].append((x.dtype, tuple(x.shape), y.dtype, float(x.mean())))
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, i):
        return self._record("train", batch)

    def validation_step(self, batch, i):
        self._record("val", batch)

    def test_step(self, batch, i):
        self._record("test", batch)

    def predict_step(self, batch, i):
        self._record("predict", batch)
        return self.net(batch[0]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_trainer_fit_validate_test_predict(tmp_path, loader):
    folder = write_official_dir(tmp_path, n_train=60, n_test=20)
    dm = dm_for(folder, tmp_path, val_size=10, batch_size=16, loader=loader, augment={"cutout_holes": 1})
    model = TinyNet()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    preds = trainer.predict(model, datamodule=dm)
    assert [s[1][0] for s in model.seen["train"]] == [16, 16, 16, 2] * 2
    assert sum(s[1][0] for s in model.seen["test"]) == 20 and sum(len(p) for p in preds) == 20
    for stage, records in model.seen.items():
        assert records, stage
        for x_dtype, shape, y_dtype, _ in records:
            assert x_dtype == torch.float32 and shape[1:] == (3, 32, 32) and y_dtype == torch.int64


def test_lightning_cli_builds_the_datamodule_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    folder = write_official_dir(tmp_path, "cifar100", n_train=10, n_test=10)

    class Linked(pl.LightningModule):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.num_classes = num_classes

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data:\n  class_path: maxdrop.data.CIFARDataModule\n  init_args:\n"
        f"    dataset: cifar100\n    data_dir: {folder}\n    cache_dir: {tmp_path / 'cache'}\n"
        "    augment: {cutout_holes: 1, cutout_length: 8, erasing_p: 0.25}\n"
    )
    cli = CLI(
        Linked,
        pl.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(cfg)],
        trainer_defaults={"logger": False},
        save_config_callback=None,
    )
    assert isinstance(cli.datamodule, CIFARDataModule) and cli.model.num_classes == 100
    assert cli.datamodule.augment.cutout_length == 8 and cli.datamodule.augment.erasing_p == 0.25
    assert cli.datamodule.augment.crop_padding == 4  # defaults kept for keys not given


# --------------------------------------------------------------------------- the real CIFAR-10


@pytest.mark.slow
def test_real_cifar10_jpeg_tarball(cifar10_jpeg, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp().parent / "maxdrop-test-cache"  # shared by later runs: fast reruns
    dm = CIFARDataModule(data_dir=str(cifar10_jpeg), cache_dir=str(cache), val_size=0)
    dm.prepare_data()
    dm.setup()
    (tx, ty), (sx, sy) = dm.split("train"), dm.split("test")
    assert tx.shape == (50000, 3, 32, 32) and sx.shape == (10000, 3, 32, 32)
    assert dm.classes == CIFAR10_CLASSES and dm.num_classes == 10
    assert torch.equal(torch.bincount(ty), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(sy), torch.full((10,), 1000))
    assert len(set(sy[:100].tolist())) == 10  # a test batch holds all classes, as in the official files
    # The well-known CIFAR-10 statistics (JPEG shifts them only slightly).
    torch.testing.assert_close(dm.mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=0.005, rtol=0)
    torch.testing.assert_close(dm.std, torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.slow
def test_real_cifar10_small_data_subset(cifar10_jpeg, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp().parent / "maxdrop-test-cache"
    dm = CIFARDataModule(data_dir=str(cifar10_jpeg), cache_dir=str(cache), val_size=5000, train_per_class=100)
    (tx, ty), (vx, vy) = dm.split("train"), dm.split("val")
    assert tx.shape == (1000, 3, 32, 32) and torch.equal(torch.bincount(ty), torch.full((10,), 100))
    assert len(vy) == 5000 and image_ids(tx).isdisjoint(image_ids(vx))
    with pytest.raises(ValueError, match=r"train_per_class=4600 is more than the 4\d\d\d training images of class"):
        CIFARDataModule(data_dir=str(cifar10_jpeg), cache_dir=str(cache), val_size=5000, train_per_class=4600).setup()


class Recorder(TinyNet):
    """Records (epoch, batch_idx, checksum of the augmented images, labels) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, int, float, list[int]]] = []

    def training_step(self, batch, i):
        x, y = batch
        self.batches.append((self.current_epoch, i, float(x.double().sum()), y.tolist()))
        return nn.functional.cross_entropy(self.net(x), y)


def fit(tmp_path, folder, max_epochs, ckpt_path=None, callbacks=(), seed_offset=0):
    torch.manual_seed(1000 + seed_offset)  # different global RNG state per run: must not matter
    dm = dm_for(folder, tmp_path, val_size=10, batch_size=16, seed=7, augment={"cutout_holes": 1, "erasing_p": 0.5})
    model = Recorder()
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, callbacks=list(callbacks), num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.batches


def test_resumed_training_sees_the_same_batches_as_a_straight_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = write_official_dir(tmp_path, n_train=74, n_test=10)  # 64 train images: 4 batches per epoch
    straight = fit(tmp_path, folder, 3)
    assert [b[:2] for b in straight] == [(e, i) for e in range(3) for i in range(4)]
    assert straight[0][2:] != straight[4][2:]  # epochs differ: the epoch is read from the trainer

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ep", save_last=True, every_n_epochs=1, save_top_k=-1)
    fit(tmp_path, folder, 1, callbacks=[ckpt], seed_offset=1)
    resumed = fit(tmp_path, folder, 3, ckpt_path=str(tmp_path / "ep" / "last.ckpt"), seed_offset=2)
    assert resumed == straight[4:]  # epochs 1 and 2, bit for bit

    mid = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=6, save_top_k=-1)
    fit(tmp_path, folder, 2, callbacks=[mid], seed_offset=3)
    (step6,) = (tmp_path / "mid").glob("*step=6.ckpt")  # saved after batch 1 of epoch 1
    resumed_mid = fit(tmp_path, folder, 3, ckpt_path=str(step6), seed_offset=4)
    assert resumed_mid == straight[6:]


class ShardRecorder(pl.LightningModule):
    """Writes the ids of every image each rank trained/validated/tested on (ids = first pixels, see data_helpers)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.lin = nn.Linear(1, 1)
        self.ids: dict[str, list[list[int]]] = {"train": [], "val": [], "test": []}

    def _ids(self, stage, batch):
        x = (batch[0] * 255).round().long()  # augment is off and normalize is off: the raw pixels
        self.ids[stage].append((x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist())

    def training_step(self, batch, i):
        self._ids("train", batch)
        return self.lin(batch[0][:, :1, 0, 0]).sum()

    def validation_step(self, batch, i):
        self._ids("val", batch)

    def test_step(self, batch, i):
        self._ids("test", batch)

    def on_train_end(self):  # ddp_spawn: each fit/test runs in fresh processes, so save after each
        torch.save(self.ids, f"{self.out_dir}/fit{self.global_rank}.pt")

    def on_test_end(self):
        torch.save(self.ids, f"{self.out_dir}/test{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_two_process_ddp_shards(tmp_path, loader):
    """Real DDP (2 gloo processes): disjoint train shards covering the split, each eval image exactly once."""
    folder = write_official_dir(tmp_path, n_train=70, n_test=23)  # 60 train, 10 val, 23 test (uneven)
    dm = dm_for(folder, tmp_path, val_size=10, batch_size=8, loader=loader, augment=AUG_OFF)
    dm.prepare_data()  # build the cache before spawning (prepare_data also runs inside, once)
    trainer = quiet_trainer(tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn", num_sanity_val_steps=0)
    model = ShardRecorder(str(tmp_path))
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    ranks = [
        {**torch.load(tmp_path / f"fit{r}.pt"), "test": torch.load(tmp_path / f"test{r}.pt")["test"]} for r in (0, 1)
    ]
    dm.setup()

    def ids(split):
        x = dm.split(split)[0].long()
        return sorted((x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist())

    train = [sum(r["train"], []) for r in ranks]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 4  # 30 per rank / 8
    assert set(train[0]).isdisjoint(train[1]) and sorted(train[0] + train[1]) == ids("train")
    for stage, split in (("val", "val"), ("test", "test")):
        assert sorted(sum(ranks[0][stage], []) + sum(ranks[1][stage], [])) == ids(split), stage


AUG_OFF = {"crop_padding": 0, "hflip": False, "normalize": False}


class OneDevicePerOp(torch.overrides.TorchFunctionMode):
    """Fails any torch op whose (non-scalar) tensor arguments lie on different devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
        assert len(devices) <= 1, f"{func} mixes devices {devices}"
        return func(*args, **kwargs)


def test_data_on_device_gathers_and_augments_on_the_trainer_device(tmp_path):
    """No GPU here: the meta device stands in for it, and every op is checked to use one device."""
    folder = write_official_dir(tmp_path, n_train=40, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=16, augment={"cutout_holes": 2, "erasing_p": 1.0, "erasing_value": 1.5})
    dm.setup()
    dm.trainer = fake_trainer()
    dm.trainer.strategy.root_device = torch.device("meta")
    try:
        with OneDevicePerOp():
            for loader in (dm.train_dataloader(), dm.test_dataloader()):
                batch = next(iter(loader))
                assert batch.images.device.type == "meta" and batch.images.dtype == torch.uint8
                x, y = dm.transform_batch(batch)
                assert x.device.type == "meta" and x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
                assert y.device.type == "meta"
    finally:
        dm.trainer = None


def test_download_fetches_both_official_splits_into_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeCIFAR100:  # stands in for the network: writes what torchvision's download leaves behind
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_official_dir(Path(root), "cifar100", n_train=10, n_test=10)

    monkeypatch.setattr(tvd, "CIFAR100", FakeCIFAR100)
    dm = dm_for(tmp_path / "dl", tmp_path, dataset="cifar100", download=True)
    dm.prepare_data()
    dm.setup()
    assert calls == [(str(tmp_path / "dl"), True, True), (str(tmp_path / "dl"), False, True)]
    assert dm.split("train")[0].shape == (10, 3, 32, 32)


def test_cache_off_and_unwritable_cache_still_load(tmp_path, caplog):
    folder = write_official_dir(tmp_path, n_train=20, n_test=10)
    off = CIFARDataModule(data_dir=str(folder), val_size=0, cache=False, cache_dir=str(tmp_path / "c"))
    assert off.split("train")[0].shape == (20, 3, 32, 32) and not (tmp_path / "c").exists()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING"):
        dm = CIFARDataModule(data_dir=str(folder), val_size=0, cache_dir=str(blocker / "cache"))
        assert torch.equal(dm.split("train")[0], off.split("train")[0])
    assert "could not write the data cache" in caplog.text


def test_drop_last_and_eval_batch_size(tmp_path):
    folder = write_official_dir(tmp_path, n_train=50, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=16, eval_batch_size=7, drop_last=True)
    assert [len(b.labels) for b in dm.train_dataloader()] == [16, 16, 16]
    assert len(dm.train_dataloader()) == 3
    assert [len(b.labels) for b in dm.test_dataloader()] == [7, 7, 6]


@pytest.mark.parametrize("world,expected", [(1, 128), (2, 64), (4, 32), (8, 16)])
def test_global_batch_size_is_divided_over_the_world(tmp_path, world, expected):
    folder = write_official_dir(tmp_path, n_train=300, n_test=20)
    dm = dm_for(folder, tmp_path, global_batch_size=128, batch_size=7)
    dm.trainer = fake_trainer(0, world)
    loader = dm.train_dataloader()
    assert dm.per_device_batch_size() == expected
    assert len(next(iter(loader)).labels) == expected


def test_global_batch_size_that_does_not_divide_is_a_clear_error(tmp_path):
    folder = write_official_dir(tmp_path, n_train=300, n_test=20)
    dm = dm_for(folder, tmp_path, global_batch_size=128)
    dm.trainer = fake_trainer(0, 3)
    with pytest.raises(ValueError, match=r"global_batch_size=128 does not divide over the world size 3"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"global_batch_size must be null or an integer >= 1, got 0"):
        dm_for(folder, tmp_path, global_batch_size=0)
