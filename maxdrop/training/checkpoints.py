"""Checkpoints that are never half-written: atomic saving, and ``last.ckpt`` always at the latest epoch.

Lightning's ``TorchCheckpointIO`` writes a checkpoint to the system temp folder and moves it into place; when
the run folder is on another filesystem (a cluster's NFS or Lustre beside a local ``/tmp``) the move is a copy,
so a full disk, a quota or a job killed during it leaves a truncated file under the final name (``last.ckpt``),
which a resume then reads. :class:`AtomicCheckpointIO` writes into the destination folder and renames
(:mod:`maxdrop.utils.atomic`); :class:`CheckpointWriteError` says which file failed and which one is intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from maxdrop.utils.atomic import atomic_save, atomic_symlink

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "LastAndBestCheckpoint"]


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, permission); the message names the file, the
    cause, and the newest checkpoint that is intact."""


def _describe_intact(path: Path) -> str:
    """Which checkpoint survives a failed write of ``path``: ``path`` itself (its previous version, which the
    failed write left alone), else the folder's ``last.ckpt``, else the newest ``*.ckpt`` there."""
    candidates = [path, path.parent / "last.ckpt"]
    others = sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in [*candidates, *others]:
        if candidate.is_file():
            try:
                saved = torch.load(candidate, map_location="cpu", weights_only=True, mmap=True)
                when = f" (epoch {saved.get('epoch')}, step {saved.get('global_step')})"
            except Exception:  # noqa: BLE001 (only for the description; the file itself is not touched)
                when = ""
            which = "the previous version of that file" if candidate == path else "the previous checkpoint"
            return f"{which}, {candidate}{when}, is intact"
    return f"no earlier checkpoint exists in {path.parent}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes local checkpoints atomically in their own folder.

    The checkpoint is written to a hidden temporary file beside its final name, fsynced and renamed over it:
    a reader sees the previous checkpoint or the new one, never a part. Remote paths (``s3://`` ...) keep
    Lightning's own saving. A failed write raises :class:`CheckpointWriteError`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        try:
            atomic_save(checkpoint, path)
        except Exception as failure:
            err = _os_error_in(failure)
            if err is None:
                raise
            cause = err.strerror or str(err)
            raise CheckpointWriteError(
                f"could not write the checkpoint {path}: {cause}; nothing under that name was "
                f"changed and {_describe_intact(path)}. Free space on that filesystem (or raise the quota, or fix "
                "the folder's permissions) and resume from it with --ckpt_path"
            ) from failure


def _os_error_in(err: BaseException | None) -> OSError | None:
    """The OSError behind ``err`` (torch.save's zip writer turns a failed write into a RuntimeError of its own,
    with the OSError as its context)."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


class LastAndBestCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose ``last.ckpt`` is always the latest epoch, beside the best by the monitor.

    Lightning 2.6 refreshes ``last.ckpt`` only in a step where it also wrote a top-k checkpoint, so with
    a monitored metric that did not improve, ``last.ckpt`` would stay at an older epoch (a resume from it
    would repeat epochs, and the last epoch's weights, which the paper reports, would be lost). With
    ``save_last: link``, ``last.ckpt`` is a symlink replaced in one step (never missing, never dangling).
    """

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: Any) -> None:
        # Skipped when the step was already saved (then last.ckpt was written with it).
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        # Lightning removes the old link before making the new one: a crash between the two leaves no last.ckpt.
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_symlink(filepath, linkpath)
        trainer.strategy.barrier()
