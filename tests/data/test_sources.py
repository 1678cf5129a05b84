"""Where the images come from: the official archives, image trees and tarballs; bad input named."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from maxdrop.data import CIFARDataModule, DataSourceError
from tests.helpers.data import (
    CIFAR10_CLASSES,
    expected_split,
    tree_files,
    write_image_tarball,
    write_image_tree,
    write_official_archive,
    write_official_dir,
)
from tests.helpers.datamodule import dm_for, official_expected

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
