"""The decode cache: reused, invalidated when the source changes, never trusted half-written."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import maxdrop.data.cache as cache_mod
from tests.helpers.data import (
    CIFAR10_CLASSES,
    official_batches,
    tree_files,
    write_image_tree,
    write_official_archive,
)
from tests.helpers.datamodule import dm_for

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
