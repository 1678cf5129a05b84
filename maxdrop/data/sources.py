"""Where CIFAR images come from: official pickles, official archives, image-folder trees and their tarballs.

Every source is decoded into one :class:`Decoded` record of uint8 tensors, images as (N, 3, 32, 32).
The sources, by what ``data_dir`` points at:

* an official folder (``cifar-10-batches-py`` / ``cifar-100-python``) or a folder that holds one
  (what ``torchvision.datasets.CIFAR10(root, download=True)`` leaves in ``root``);
* an official archive (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) or a folder holding it;
* an image-folder tree ``train/<class>/*`` + ``test/<class>/*`` (at ``data_dir`` or one folder below),
  or a ``.tar``/``.tar.gz`` of one, such as ``cifar10-jpeg.tar.gz``. Labels are the class folders in
  sorted order, which for CIFAR-10 and CIFAR-100 is the official label order. Images are read in
  (class, natural file name) order and stored in a fixed pseudo-random permutation of it
  (``TREE_ORDER_SEED``), so that, as in the official files, neighbouring images are of mixed classes.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Decoded",
    "DataSourceError",
    "Source",
    "check_dataset",
    "decode_source",
    "find_source",
]


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    folder: str  # the official extracted folder
    archive: str  # the official archive's file name
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str  # key of the labels in each pickle
    names_key: str  # key of the class names in the meta pickle
    tv_class: str  # torchvision.datasets class that downloads it


DATASETS: dict[str, _Spec] = {
    "cifar10": _Spec(
        10,
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10",
    ),
    "cifar100": _Spec(
        100,
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        ("train",),
        "test",
        "meta",
        "fine_labels",
        "fine_label_names",
        "CIFAR100",
    ),
}

#: Seed of the fixed order in which image-folder splits are stored (class folders are mixed).
TREE_ORDER_SEED = 0
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff"}
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DataSourceError(ValueError):
    """A data source that is missing, of the wrong kind, damaged or inconsistent."""


def check_dataset(dataset: object) -> str:
    """Return ``dataset`` if it names a known dataset, else raise ``ValueError`` listing the known names."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(map(repr, DATASETS))}")
    return dataset  # type: ignore[return-value]


@dataclass
class Decoded:
    """A whole dataset, decoded.

    Attributes:
        train_images: uint8 (N_train, 3, 32, 32).
        train_labels: int64 (N_train,).
        test_images: uint8 (N_test, 3, 32, 32).
        test_labels: int64 (N_test,).
        classes: class names, index = label.
        mean: float64 (3,), per-channel mean of the train images in [0, 1].
        std: float64 (3,), per-channel standard deviation of the train images in [0, 1].
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    mean: Tensor
    std: Tensor


@dataclass(frozen=True)
class Source:
    """A located source.

    Attributes:
        path: the file or folder read.
        kind: ``"official-dir"``, ``"archive"`` (official or image-folder tar, told apart while reading)
            or ``"image-dir"``.
    """

    path: Path
    kind: str

    def fingerprint(self) -> str:
        """Hex digest that changes whenever the source's content can have changed.

        Archives and official pickles: sha256 of their bytes (tens of ms for CIFAR). Image-folder trees
        (tens of thousands of files): sha256 of every file's relative path, size and mtime in ns.
        """
        h = hashlib.sha256(f"{self.kind}\0".encode())
        if self.kind == "archive":
            _hash_file(h, self.path)
        elif self.kind == "official-dir":
            for f in sorted(p for p in self.path.iterdir() if p.is_file()):
                h.update(f"{f.name}\0".encode())
                _hash_file(h, f)
        else:
            for split in ("train", "test"):
                for dirpath, dirnames, filenames in os.walk(self.path / split):
                    dirnames.sort()
                    for name in sorted(filenames):
                        st = os.stat(os.path.join(dirpath, name))
                        rel = os.path.relpath(os.path.join(dirpath, name), self.path)
                        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        return h.hexdigest()


def _hash_file(h: hashlib._Hash, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def _is_tar_name(path: Path) -> bool:
    return path.name.lower().endswith(_TAR_SUFFIXES)


def _is_official_dir(path: Path, spec: _Spec) -> bool:
    return all((path / f).is_file() for f in (*spec.train_files, spec.test_file))


def _image_tree_root(path: Path) -> Path | None:
    """``path`` or its only sub-folder, if it holds ``train/`` and ``test/`` folders."""
    if (path / "train").is_dir() and (path / "test").is_dir():
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir() and (subdirs[0] / "test").is_dir():
        return subdirs[0]
    return None


def find_source(dataset: str, data_dir: str | os.PathLike) -> Source:
    """Locate the data for ``dataset`` at ``data_dir`` (see the module docstring for what is accepted).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist, or holds nothing this module can read.
        DataSourceError: ``data_dir`` is a file that is not a tar archive.
    """
    spec = DATASETS[check_dataset(dataset)]
    path = Path(data_dir).expanduser()
    expected = (
        f"expected the official {spec.archive} or its extracted {spec.folder}/ (torchvision's layout; "
        f"download=True fetches it), or an image-folder tree train/<class>/*, test/<class>/* or a .tar.gz of one"
    )
    if not path.exists():
        raise FileNotFoundError(f"data_dir {str(path)!r} does not exist; {expected}")
    if path.is_file():
        if not _is_tar_name(path) and not tarfile.is_tarfile(path):
            raise DataSourceError(f"{str(path)!r} is not a tar archive (.tar, .tar.gz, .tgz); {expected}")
        return Source(path, "archive")
    if _is_official_dir(path, spec):
        return Source(path, "official-dir")
    if _is_official_dir(path / spec.folder, spec):
        return Source(path / spec.folder, "official-dir")
    if (path / spec.archive).is_file():
        return Source(path / spec.archive, "archive")
    root = _image_tree_root(path)
    if root is not None:
        return Source(root, "image-dir")
    raise FileNotFoundError(f"found no {dataset} data in folder {str(path)!r}; {expected}")


# --------------------------------------------------------------------------- decoding


def _unpickle(blob: bytes, where: str) -> dict:
    try:
        d = pickle.loads(blob, encoding="latin1")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise DataSourceError(f"{where} is not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise DataSourceError(f"{where} is not a CIFAR pickle (holds a {type(d).__name__}, expected a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _official_split(blobs: list[tuple[str, bytes]], spec: _Spec) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for where, blob in blobs:
        d = _unpickle(blob, where)
        if "data" not in d or spec.label_key not in d:
            raise DataSourceError(f"{where} lacks 'data' or {spec.label_key!r}; keys: {sorted(d)}")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != len(d[spec.label_key]):
            raise DataSourceError(
                f"{where}: 'data' has shape {data.shape} for {len(d[spec.label_key])} labels, expected (N, 3072)"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))  # rows are CHW-ordered already
        labels.append(torch.as_tensor(np.asarray(d[spec.label_key], dtype=np.int64)))
    return torch.cat(images), torch.cat(labels)


def _decode_official(files: dict[str, bytes], spec: _Spec, where: str) -> Decoded:
    train_x, train_y = _official_split([(f"{where}/{f}", files[f]) for f in spec.train_files], spec)
    test_x, test_y = _official_split([(f"{where}/{spec.test_file}", files[spec.test_file])], spec)
    if spec.meta_file in files:
        names = _unpickle(files[spec.meta_file], f"{where}/{spec.meta_file}").get(spec.names_key)
        classes = (
            [c.decode() if isinstance(c, bytes) else str(c) for c in names]
            if names is not None
            else [str(i) for i in range(spec.num_classes)]
        )
    else:
        classes = [str(i) for i in range(spec.num_classes)]
    return _finish(train_x, train_y, test_x, test_y, classes, spec, where)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _decode_images(blobs: list[bytes], where: list[str]) -> Tensor:
    """Decode image files to uint8 (N, 3, 32, 32): JPEGs batched through libjpeg, the rest through PIL."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    out = torch.empty((len(blobs), 3, 32, 32), dtype=torch.uint8)
    jpeg = [i for i, b in enumerate(blobs) if b[:3] == b"\xff\xd8\xff"]
    for start in range(0, len(jpeg), 4096):  # batched decode: ~5x faster than PIL one by one
        idx = jpeg[start : start + 4096]
        try:
            imgs = decode_jpeg([_bytes_tensor(blobs[i]) for i in idx], ImageReadMode.RGB)
        except RuntimeError:  # locate the bad file for the message
            imgs = []
            for i in idx:
                try:
                    imgs.append(decode_jpeg(_bytes_tensor(blobs[i]), ImageReadMode.RGB))
                except RuntimeError as e:
                    raise DataSourceError(f"cannot decode image {where[i]!r}: {e}") from e
        for i, img in zip(idx, imgs, strict=True):
            _put(out, i, img, where[i])
    for i in sorted(set(range(len(blobs))) - set(jpeg)):
        try:
            with Image.open(io.BytesIO(blobs[i])) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise DataSourceError(f"cannot decode image {where[i]!r}: {e}") from e
        _put(out, i, torch.from_numpy(arr.copy()).permute(2, 0, 1), where[i])
    return out


def _bytes_tensor(blob: bytes) -> Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def _put(out: Tensor, i: int, img: Tensor, where: str) -> None:
    if tuple(img.shape) != (3, 32, 32):
        raise DataSourceError(f"image {where!r} is {img.shape[2]}x{img.shape[1]}, expected 32x32 (CIFAR)")
    out[i] = img


def _decode_tree(files: dict[str, dict[str, list[tuple[str, bytes]]]], spec: _Spec, where: str) -> Decoded:
    """``files[split][class]`` = [(name, bytes)] -> Decoded, labels = sorted class names."""
    classes = {s: sorted(files.get(s, {})) for s in ("train", "test")}
    for s in ("train", "test"):
        if not classes[s]:
            raise DataSourceError(f"{where}: no {s}/<class>/<image> files found")
    if classes["train"] != classes["test"]:
        only_train = sorted(set(classes["train"]) - set(classes["test"]))
        only_test = sorted(set(classes["test"]) - set(classes["train"]))
        raise DataSourceError(
            f"{where}: train and test have different classes (only in train: {only_train}, only in test: "
            f"{only_test}); both must hold the same class folders"
        )
    names = classes["train"]
    split_tensors = []
    for s in ("train", "test"):
        blobs, labels, wheres = [], [], []
        for label, c in enumerate(names):
            for name, blob in sorted(files[s][c], key=lambda t: _natural_key(t[0])):
                blobs.append(blob)
                labels.append(label)
                wheres.append(f"{where}/{s}/{c}/{name}")
        # Store in a fixed mixed order, as the official files are: class-sorted test batches would make
        # batch-dependent layers (MaxDropout, scope="tensor", active in eval) and partial evaluation
        # (limit_val_batches) see one class at a time.
        order = torch.randperm(len(blobs), generator=torch.Generator().manual_seed(TREE_ORDER_SEED))
        images = _decode_images([blobs[i] for i in order], [wheres[i] for i in order])
        split_tensors += [images, torch.tensor(labels, dtype=torch.int64)[order]]
    return _finish(*split_tensors, names, spec, where)


def _finish(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, classes: list[str], spec: _Spec, where: str
) -> Decoded:
    if len(classes) != spec.num_classes:
        raise DataSourceError(
            f"{where} holds {len(classes)} classes, but the dataset has {spec.num_classes}; "
            f"is dataset set right (cifar10 has 10 classes, cifar100 has 100)?"
        )
    for name, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise DataSourceError(f"{where}: {name} labels outside [0, {spec.num_classes - 1}]")
    mean, std = _channel_stats(train_x)
    return Decoded(train_x, train_y, test_x, test_y, classes, mean, std)


def _channel_stats(images: Tensor) -> tuple[Tensor, Tensor]:
    """Exact per-channel mean/std in [0, 1] of uint8 (N, 3, H, W), from a 256-bin histogram per channel."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for c in range(3):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum().clamp_min(1)
        mean[c] = (hist * values).sum() / total
        std[c] = ((hist * (values - mean[c]) ** 2).sum() / total).sqrt()
    return mean, std


def _read_official_dir(path: Path, spec: _Spec) -> Decoded:
    names = [*spec.train_files, spec.test_file, spec.meta_file]
    files = {n: (path / n).read_bytes() for n in names if (path / n).is_file()}
    return _decode_official(files, spec, str(path))


def _read_image_dir(root: Path, spec: _Spec) -> Decoded:
    files: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    for s in ("train", "test"):
        split = files.setdefault(s, {})
        for cdir in sorted(p for p in (root / s).iterdir() if p.is_dir() and not p.name.startswith(".")):
            split[cdir.name] = [
                (f.name, f.read_bytes()) for f in cdir.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_EXTS
            ]
    return _decode_tree(files, spec, str(root))


def _read_archive(path: Path, spec: _Spec, dataset: str) -> Decoded:
    """One streaming pass over the tar: official pickles and image-folder members are both collected."""
    official_names = {*spec.train_files, spec.test_file, spec.meta_file}
    other = {n: s for n, s in DATASETS.items() if n != dataset}
    official: dict[str, bytes] = {}
    tree: dict[str, dict[str, list[tuple[str, bytes]]]] = {}
    seen_other: str | None = None
    try:
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                parts = m.name.strip("/").split("/")
                if len(parts) >= 2 and parts[-2] == spec.folder and parts[-1] in official_names:
                    official[parts[-1]] = tf.extractfile(m).read()
                elif len(parts) >= 3 and parts[-3] in ("train", "test"):
                    if os.path.splitext(parts[-1])[1].lower() in _IMAGE_EXTS and not parts[-1].startswith("."):
                        blob = tf.extractfile(m).read()
                        tree.setdefault(parts[-3], {}).setdefault(parts[-2], []).append((parts[-1], blob))
                else:
                    seen_other = seen_other or next((n for n, s in other.items() if s.folder in parts[:-1]), None)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataSourceError(
            f"{str(path)!r} is truncated or damaged ({type(e).__name__}: {e}); delete it and download or copy it again"
        ) from e
    if all(f in official for f in (*spec.train_files, spec.test_file)):
        return _decode_official(official, spec, str(path))
    if tree:
        return _decode_tree(tree, spec, str(path))
    if seen_other:
        raise DataSourceError(
            f"{str(path)!r} holds {seen_other}, not {dataset}; set dataset: {seen_other} or fix data_dir"
        )
    missing = sorted(f for f in (*spec.train_files, spec.test_file) if f not in official)
    raise DataSourceError(
        f"{str(path)!r} is not a {dataset} archive: expected the official {spec.archive} layout "
        f"({spec.folder}/{{{', '.join(spec.train_files)}, {spec.test_file}}}; missing {missing}) "
        "or an image-folder tree train/<class>/*, test/<class>/*"
    )


def decode_source(source: Source, dataset: str) -> Decoded:
    """Read and decode a located source into uint8 tensors (seconds for the CIFAR-10 JPEG tarball)."""
    spec = DATASETS[check_dataset(dataset)]
    if source.kind == "official-dir":
        return _read_official_dir(source.path, spec)
    if source.kind == "image-dir":
        return _read_image_dir(source.path, spec)
    return _read_archive(source.path, spec, dataset)
