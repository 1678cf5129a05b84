"""Decode-once cache of a CIFAR source as uint8 tensors.

One file per (dataset, source content): ``<cache_dir>/<dataset>-<fingerprint[:24]>.pt``, a ``torch.save``
of plain tensors and lists (loaded with ``weights_only=True`` and memory-mapped). The fingerprint
(:meth:`Source.fingerprint`) changes whenever the source can have changed, so a stale cache is never
found under the new name. Files are written atomically (:func:`maxdrop.utils.atomic.atomic_save`): an
interrupted decode leaves at most a hidden ``.*.tmp`` file, which is never read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from maxdrop.data.sources import Decoded, Source, decode_source
from maxdrop.utils.atomic import atomic_save

__all__ = ["CACHE_VERSION", "cache_path", "default_cache_dir", "load_or_decode"]

log = logging.getLogger(__name__)

#: Bumped whenever the cached layout or the decoding changes, so old caches are ignored.
CACHE_VERSION = 2
_FIELDS = ("train_images", "train_labels", "test_images", "test_labels", "mean", "std")


def default_cache_dir() -> Path:
    """``$MAXDROP_CACHE``, else ``$XDG_CACHE_HOME/maxdrop``, else ``~/.cache/maxdrop``."""
    if env := os.environ.get("MAXDROP_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "maxdrop"


def cache_path(cache_dir: str | os.PathLike, dataset: str, fingerprint: str) -> Path:
    """The cache file for ``dataset`` decoded from a source with this fingerprint."""
    return Path(cache_dir).expanduser() / f"{dataset}-v{CACHE_VERSION}-{fingerprint[:24]}.pt"


def _load(path: Path, dataset: str, fingerprint: str) -> Decoded | None:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("ignoring unreadable cache %s (%s: %s); decoding again", path, type(e).__name__, e)
        return None
    if not isinstance(obj, dict) or obj.get("fingerprint") != fingerprint or obj.get("dataset") != dataset:
        log.warning("ignoring cache %s: it belongs to another source", path)
        return None
    try:
        fields = {k: obj[k] for k in _FIELDS}
        classes = list(obj["classes"])
    except KeyError as e:
        log.warning("ignoring incomplete cache %s (missing %s)", path, e)
        return None
    return Decoded(classes=classes, **fields)


def load_or_decode(
    source: Source, dataset: str, cache_dir: str | os.PathLike | None, *, write: bool = True
) -> tuple[Decoded, Path | None]:
    """Return the decoded dataset, from the cache when a valid one exists, else decoded (and cached).

    Args:
        source: a located source (:func:`maxdrop.data.sources.find_source`).
        dataset: ``"cifar10"`` or ``"cifar100"``.
        cache_dir: folder of cache files; ``None`` disables caching (decode every time).
        write: write a missing cache (False: read-only use, e.g. on ranks that must not write).

    Returns:
        (decoded data, path of the cache file used or written, or None).
    """
    if cache_dir is None:
        return decode_source(source, dataset), None
    fingerprint = source.fingerprint()
    path = cache_path(cache_dir, dataset, fingerprint)
    if path.is_file() and (cached := _load(path, dataset, fingerprint)) is not None:
        return cached, path
    decoded = decode_source(source, dataset)
    if not write:
        return decoded, None
    obj = {k: getattr(decoded, k) for k in _FIELDS}
    obj.update(classes=list(decoded.classes), dataset=dataset, fingerprint=fingerprint, source=str(source.path))
    try:
        atomic_save(obj, path)
    except OSError as e:  # a read-only cache folder must not stop training
        log.warning("could not write the data cache %s (%s); continuing without it", path, e)
        return decoded, None
    return decoded, path
