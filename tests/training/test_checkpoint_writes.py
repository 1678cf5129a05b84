"""Checkpoints are never half-written under their final name: a write that fails halfway (a full disk, a
copy across filesystems cut short) leaves the previous checkpoint intact and stops the run with a message."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from maxdrop.cli import main
from maxdrop.training.checkpoints import AtomicCheckpointIO, CheckpointWriteError
from maxdrop.utils import atomic
from tests.helpers.data import tiny_run_config

PREVIOUS = {"state_dict": {"w": torch.arange(4000.0)}, "epoch": 3, "global_step": 12}
NEW = {"state_dict": {"w": torch.randn(100_000)}, "epoch": 4, "global_step": 16}


def _assert_previous(path: Path) -> None:
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["state_dict"]["w"], PREVIOUS["state_dict"]["w"])


class _HalfThenFull(io.FileIO):
    """A file that takes half of the first large write, then fails as a full disk does."""

    def write(self, data):
        data = bytes(data)
        if len(data) > 1000:
            super().write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_a_write_that_fails_halfway_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(PREVIOUS, path)
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        atomic.os,
        "fdopen",
        lambda fd, mode, **k: _HalfThenFull(fd, "wb") if "b" in mode else real_fdopen(fd, mode, **k),
    )
    with pytest.raises(CheckpointWriteError) as err:
        AtomicCheckpointIO().save_checkpoint(NEW, path)
    message = str(err.value)
    assert f"could not write the checkpoint {path}: No space left on device" in message
    assert f"the previous version of that file, {path} (epoch 3, step 12), is intact" in message
    _assert_previous(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize(("io_class", "survives"), [(AtomicCheckpointIO, True), (TorchCheckpointIO, False)])
def test_a_move_across_filesystems_cut_halfway(tmp_path, monkeypatch, io_class, survives):
    """The system temp folder on another filesystem: a rename fails with EXDEV and a move becomes a copy,
    which here stops halfway. Lightning's own saving (the contrast) leaves a truncated file; ours never moves."""
    run, other = tmp_path / "run", tmp_path / "tmp"
    run.mkdir(), other.mkdir()
    path = run / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(PREVIOUS, path)
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    real_rename = os.rename

    def rename(src, dst, *a, **k):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real_rename(src, dst, *a, **k)

    def copy_half(src, dst, *a, **k):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "copyfile", copy_half)
    monkeypatch.setattr(shutil, "copy2", copy_half)
    if survives:
        io_class().save_checkpoint(NEW, path)  # written in its own folder: there is no move to cut
        assert torch.load(path, weights_only=True)["epoch"] == 4
        assert list(other.iterdir()) == [] and sorted(p.name for p in run.iterdir()) == ["last.ckpt"]
    else:
        with pytest.raises(OSError):
            io_class().save_checkpoint(NEW, path)
        with pytest.raises(Exception):  # noqa: B017 (whatever torch raises for a truncated file)
            torch.load(path, weights_only=True)


def test_last_ckpt_link_is_replaced_in_one_step(tmp_path):
    target_a, target_b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    AtomicCheckpointIO().save_checkpoint(PREVIOUS, target_a)
    AtomicCheckpointIO().save_checkpoint(NEW, target_b)
    link = tmp_path / "last.ckpt"
    atomic.atomic_symlink(target_a, link)
    atomic.atomic_symlink(target_b, link)
    assert link.is_symlink() and os.readlink(link) == "b.ckpt"
    assert torch.load(link, weights_only=True)["epoch"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "last.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only: CI runs as root), unmounted afterwards."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_run_and_keeps_the_previous_last_ckpt(
    tmp_path, tiny_tree, small_disk, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(tiny_run_config(str(tiny_tree), trainer={"max_epochs": 1, "limit_val_batches": 1}))
    logger = json.dumps(
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(small_disk), "name": "runs", "version": "v"},
        }
    )
    common = ["fit", "--config", str(cfg), "--trainer.logger", logger]
    main(common)
    ckpts = small_disk / "runs" / "v" / "checkpoints"
    last = ckpts / "last.ckpt"
    before = last.read_bytes()
    # Fill the disk but for 64 kB: enough for the logs, not for a checkpoint.
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))
    with pytest.raises(SystemExit) as exc:
        main([*common, "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    message = " ".join(err.split())
    assert "Traceback" not in err and message.startswith("maxdrop: error: could not write the checkpoint ")
    assert "No space left on device" in message
    assert f"{last} (epoch 0, step 4), is intact" in message and "resume from it with --ckpt_path" in message
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=True)["epoch"] == 0
    # No truncated file under a final name, and no temporary file left behind.
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == sorted(["last.ckpt", next(n for n in names if n.startswith("best-epoch000"))])
    for name in names:
        torch.load(ckpts / name, weights_only=True)
