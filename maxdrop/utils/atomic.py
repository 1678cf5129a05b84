"""Atomic file writes: a reader (a resume, a report, another process) sees the old file or the new one,
never a half-written one, whether the writer dies, the disk fills or the destination is on another
filesystem than the system's temp folder.

The bytes go to a hidden temporary file in the destination folder (``.<name>.<random>.tmp``: no glob for
``*.ckpt`` or ``*.json`` picks it up), are flushed and fsynced, and the temporary file is renamed over the
final name with ``os.replace`` (atomic on POSIX and Windows within one filesystem, which the same folder
guarantees). Any failure removes the temporary file and leaves the final name as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_save", "atomic_symlink", "atomic_write", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) refuse fsync on a folder; the rename is done anyway
    finally:
        os.close(fd)


def _replace_or_remove(tmp: str | os.PathLike, path: Path) -> None:
    """Rename ``tmp`` over ``path`` and fsync the folder; if the rename fails, remove ``tmp`` and re-raise."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing so that it appears complete or not at all.

    Yields a file object of a temporary file in ``path``'s folder (created if missing); when the block
    ends without an exception the file is flushed, fsynced and renamed over ``path``. An exception (e.g.
    ``OSError`` ENOSPC) removes the temporary file, leaves ``path`` untouched and propagates.

    Args:
        path: the final name.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the final file private
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _replace_or_remove(tmp, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write`)."""
    import torch  # here, so that text-only users of this module do not pay for importing torch

    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


def atomic_symlink(target: str | os.PathLike, link: str | os.PathLike) -> None:
    """Point ``link`` at ``target`` (a relative symlink) in one step: the old link or file stays until the
    new link replaces it. Where symlinks cannot be made (Windows without the privilege), ``target`` is
    copied atomically instead."""
    link = Path(link)
    relative = os.path.relpath(target, link.parent)
    tmp = link.parent / f".{link.name}.{os.getpid()}.link.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.symlink(relative, tmp)
    except OSError:
        with open(target, "rb") as src, atomic_write(link, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        return
    _replace_or_remove(tmp, link)
