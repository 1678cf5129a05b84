"""A process killed while writing a checkpoint never leaves a truncated file that loads as valid."""

import subprocess
import sys
import textwrap

import torch

KILLED_WHILE_WRITING = textwrap.dedent(
    """
    import io, os, sys
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    path = sys.argv[1]
    real_write = io.BufferedWriter.write

    class Dying(io.FileIO):
        def write(self, data):
            # write half of the bytes, then die as a SIGKILL would: no cleanup, no rollback
            super().write(bytes(data)[: len(data) // 2])
            os._exit(9)

    import builtins
    real_open = builtins.open
    def open_(file, mode="r", *a, **k):
        if "w" in mode and "b" in mode and str(file) != path + ".marker":
            return Dying(file, "wb")
        return real_open(file, mode, *a, **k)
    builtins.open = open_
    TorchCheckpointIO().save_checkpoint({"state_dict": {"w": torch.randn(1000, 100)}}, path)
    """
)


def test_checkpoint_killed_mid_write_leaves_the_previous_file_intact(tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    path = tmp_path / "last.ckpt"
    previous = {"state_dict": {"w": torch.ones(3)}, "epoch": 1}
    TorchCheckpointIO().save_checkpoint(previous, str(path))
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    # the target still holds the complete previous checkpoint; the half-written bytes went to a temp file
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))


def test_checkpoint_killed_mid_first_write_leaves_no_file(tmp_path):
    path = tmp_path / "epoch=0.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, str(path)], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert not path.exists()
    # nothing that a resume (`--ckpt_path last`) or a glob for *.ckpt would pick up
    assert list(tmp_path.glob("*.ckpt")) == []
