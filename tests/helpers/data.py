"""Builders of tiny CIFAR sources in the official and image-folder layouts, for tests (no download)."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(n: int, offset: int = 0) -> np.ndarray:
    """uint8 (n, 3, 32, 32), all distinct (index i in the first pixel), varied in every channel and position."""
    i = np.arange(offset, offset + n)[:, None, None, None]
    c = np.arange(3)[None, :, None, None]
    h = np.arange(32)[None, None, :, None]
    w = np.arange(32)[None, None, None, :]
    img = ((i * 37 + c * 80 + h * 5 + w * 3) % 256).astype(np.uint8)
    img[:, 0, 0, 0] = i[:, 0, 0, 0] % 256  # the index itself, so that no two images are equal
    img[:, 1, 0, 0] = i[:, 0, 0, 0] // 256
    return img


def official_batches(dataset: str, n_train: int, n_test: int, seed: int = 0) -> dict[str, dict]:
    """Pickle payloads of the official layout: {file name: dict}. Labels cycle through the classes."""
    k = 10 if dataset == "cifar10" else 100
    rng = np.random.default_rng(seed)
    train_x, test_x = make_images(n_train), make_images(n_test, offset=n_train)
    train_y, test_y = rng.integers(0, k, n_train).tolist(), rng.integers(0, k, n_test).tolist()
    if dataset == "cifar10":
        parts = np.array_split(np.arange(n_train), 5)
        files = {
            f"data_batch_{j + 1}": {
                b"batch_label": f"training batch {j + 1} of 5".encode(),
                b"labels": [train_y[i] for i in p],
                b"data": train_x[p].reshape(len(p), 3072),
                b"filenames": [f"img_{i}.png".encode() for i in p],
            }
            for j, p in enumerate(parts)
        }
        files["test_batch"] = {b"labels": test_y, b"data": test_x.reshape(n_test, -1)}
        files["batches.meta"] = {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072}
    else:
        files = {
            "train": {
                b"fine_labels": train_y,
                b"coarse_labels": [y // 5 for y in train_y],
                b"data": train_x.reshape(n_train, -1),
            },
            "test": {
                b"fine_labels": test_y,
                b"coarse_labels": [y // 5 for y in test_y],
                b"data": test_x.reshape(n_test, -1),
            },
            "meta": {b"fine_label_names": [f"class{c:03d}".encode() for c in range(100)]},
        }
    return files


def write_official_dir(
    root: Path, dataset: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0
) -> Path:
    """Write the extracted official folder (cifar-10-batches-py / cifar-100-python) under ``root``."""
    folder = root / ("cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in official_batches(dataset, n_train, n_test, seed).items():
        (folder / name).write_bytes(pickle.dumps(payload, protocol=2))
    return folder


def write_official_archive(
    path: Path, dataset: str = "cifar10", n_train: int = 50, n_test: int = 20, seed: int = 0
) -> Path:
    """Write an official-layout ``.tar.gz`` at ``path``."""
    folder = "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, payload in official_batches(dataset, n_train, n_test, seed).items():
            _add_bytes(tf, f"{folder}/{name}", pickle.dumps(payload, protocol=2))
    return path


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _encode(img_chw: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_chw.transpose(1, 2, 0)).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def tree_files(
    classes: list[str], per_class: dict[str, int], fmt: str = "PNG", test_classes: list[str] | None = None
) -> dict[str, tuple[np.ndarray, int]]:
    """{relative path: (image CHW, label)} of an image-folder tree; labels = index in sorted(classes)."""
    out: dict[str, tuple[np.ndarray, int]] = {}
    offset = 0
    ext = "png" if fmt == "PNG" else "jpg"
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c in names:
            imgs = make_images(per_class[split], offset)
            offset += per_class[split]
            for j, img in enumerate(imgs):
                out[f"{split}/{c}/{j:04d}.{ext}"] = (img, sorted(names).index(c))
    return out


def write_image_tree(root: Path, files: dict[str, tuple[np.ndarray, int]], fmt: str = "PNG") -> Path:
    for rel, (img, _) in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_encode(img, fmt))
    return root


def write_image_tarball(
    path: Path, files: dict[str, tuple[np.ndarray, int]], fmt: str = "PNG", prefix: str = "cifar10-jpeg"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for rel, (img, _) in files.items():
            _add_bytes(tf, f"{prefix}/{rel}", _encode(img, fmt))
    return path


def expected_split(files: dict[str, tuple[np.ndarray, int]], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``split`` in the order the datamodule stores them: read in (class, file name)
    order, then permuted by the fixed ``TREE_ORDER_SEED`` permutation."""
    import torch

    from maxdrop.data.sources import TREE_ORDER_SEED

    items = sorted((v[1], rel, v[0]) for rel, v in files.items() if rel.startswith(split + "/"))
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(TREE_ORDER_SEED)).tolist()
    return np.stack([items[i][2] for i in order]), np.array([items[i][0] for i in order])


def tiny_run_config(
    data_dir: str,
    slots: dict | str | None = "default",
    lr_scheduler: dict | None | str = "paper",
    data: dict | None = None,
    trainer: dict | None = None,
) -> str:
    """YAML of a tiny `maxdrop fit` run: FastCNN (4-8-8 channels), SGD, the CIFAR datamodule, the monitor.

    ``slots="default"``: MaxDropout(0.3) in ``stage1`` and nn.Dropout(0.1) in ``block``; ``lr_scheduler="paper"``
    keeps the module's default; ``data``/``trainer`` update those sections' arguments.
    """
    import yaml

    if slots == "default":
        slots = {
            "stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}},
            "block": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.1}},
        }
    model_args: dict = {
        "backbone": {"class_path": "maxdrop.models.FastCNN", "init_args": {"widths": [4, 8, 8], "slots": slots}},
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}},
    }
    if lr_scheduler != "paper":
        model_args["lr_scheduler"] = lr_scheduler
    config = {
        "model": {"class_path": "maxdrop.module.ClassificationModule", "init_args": model_args},
        "data": {
            "class_path": "maxdrop.data.CIFARDataModule",
            "init_args": {"data_dir": str(data_dir), "batch_size": 8, "val_size": 10, "cache": False, **(data or {})},
        },
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "maxdrop.callbacks.SparsityMonitor"}],
            **(trainer or {}),
        },
    }
    return yaml.safe_dump(config, sort_keys=False)
