"""CIFAR-10/100 LightningDataModule with a whole-split tensor fast path and a torch DataLoader path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from maxdrop.data.augment import AugmentConfig, apply_batch, image_transform
from maxdrop.data.cache import default_cache_dir, load_or_decode
from maxdrop.data.loaders import SUBSET_STREAM, EvalShardSampler, RawBatch, TensorLoader, UInt8Images, derive_seed
from maxdrop.data.sources import DATASETS, Decoded, check_dataset, find_source
from maxdrop.utils.distributed import destroy_process_group_at_exit

__all__ = ["LOADERS", "CIFARDataModule", "RawBatch", "TensorLoader"]

#: ``tensor``: the whole split as one uint8 tensor, batches by index_select, augmentation batched on the
#: batch's device. ``dataloader``: torch DataLoader, per-image torchvision transforms v2 in the workers.
LOADERS = ("tensor", "dataloader")


class CIFARDataModule(pl.LightningDataModule):
    """CIFAR-10 / CIFAR-100 for Lightning, from official files, official archives or image folders.

    Batches reaching ``training_step`` etc. are ``(images, labels)``: images float32 (N, 3, 32, 32)
    augmented (train only) and normalized, labels int64 (N,). ``batch_size`` is per device: with DDP on
    W processes a step sees W x batch_size images. Each rank gets its own shard (see :class:`TensorLoader`;
    the DataLoader path uses ``DistributedSampler`` for train and an unpadded shard sampler for eval).

    Args:
        dataset: ``"cifar10"`` or ``"cifar100"``.
        data_dir: a folder or archive: the official torchvision layout (``cifar-10-batches-py/``,
            ``cifar-100-python/``) or archive (``cifar-10-python.tar.gz``, ...), a folder holding one, an
            image-folder tree ``train/<class>/*`` + ``test/<class>/*`` or a ``.tar``/``.tar.gz`` of one.
        download: download the official archive into ``data_dir`` with torchvision if it is not there
            (once per node, in ``prepare_data``).
        batch_size: training batch size per device.
        global_batch_size: training batch size summed over all processes (devices x nodes); when set, it
            replaces ``batch_size`` with ``global_batch_size / world_size`` at setup, so a config keeps the
            paper's batch (128) on any number of GPUs. It must divide by the world size.
        eval_batch_size: validation/test/predict batch size per device; None = ``batch_size``.
        val_size: images held out of the train split for validation (seeded by ``split_seed``); 0 =
            validate on the test split.
        split_seed: seed of the train/validation split (the same on every rank and run).
        train_per_class: train on a stratified subset of exactly this many images per class (small-data
            studies); None = every training image. The validation split (``val_size``) is drawn first, so
            the subset comes from the remaining images and never overlaps it.
        subset_seed: seed of that subset, independent of ``seed`` and ``split_seed``: every seed of every
            config of a study trains on the same images, and a smaller subset lies inside a larger one.
        seed: seed of the shuffle order and augmentation (tensor path); None = ``$PL_GLOBAL_SEED``
            (set by ``seed_everything``) or 0.
        loader: ``"tensor"`` (whole split as one uint8 tensor, batch-wise augmentation on the batch's
            device) or ``"dataloader"`` (torch DataLoader with per-image torchvision transforms v2).
        num_workers: DataLoader worker processes (``"dataloader"`` only).
        pin_memory: pin batches in page-locked memory for faster copies to a GPU.
        data_on_device: tensor path: keep the uint8 splits on the accelerator (150 MB for CIFAR) so that
            batches are gathered there, with no host-to-device copy per step.
        drop_last: drop the last incomplete training batch of each epoch.
        augment: augmentation settings overriding the defaults of
            :class:`~maxdrop.data.augment.AugmentConfig` (random crop with padding 4 and horizontal flip
            on; Cutout and RandomErasing off; normalization with the dataset's mean/std on). Keys:
            crop_padding, hflip, cutout_holes, cutout_length, erasing_p, erasing_scale, erasing_ratio,
            erasing_value, normalize, mean, std.
        cache_dir: folder of decoded caches; None = ``$MAXDROP_CACHE`` or ``~/.cache/maxdrop``.
        cache: cache decoded images (off: decode the source on every ``setup``).
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        global_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        split_seed: int = 0,
        train_per_class: int | None = None,
        subset_seed: int = 0,
        seed: int | None = None,
        loader: str = "tensor",
        num_workers: int = 0,
        pin_memory: bool = False,
        data_on_device: bool = True,
        drop_last: bool = False,
        augment: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        cache: bool = True,
    ) -> None:
        super().__init__()
        self.dataset = check_dataset(dataset)
        if loader not in LOADERS:
            raise ValueError(f"unknown loader {loader!r}; allowed: {', '.join(map(repr, LOADERS))}")
        for name, v, lo in (("batch_size", batch_size, 1), ("val_size", val_size, 0), ("num_workers", num_workers, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(subset_seed, bool) or not isinstance(subset_seed, int) or subset_seed < 0:
            raise ValueError(f"subset_seed must be an integer >= 0, got {subset_seed!r}")
        for name, v in (
            ("eval_batch_size", eval_batch_size),
            ("global_batch_size", global_batch_size),
            ("train_per_class", train_per_class),
        ):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be null or an integer >= 1, got {v!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.train_per_class = train_per_class
        self.subset_seed = subset_seed
        self.seed = int(seed if seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))
        if self.seed < 0:
            raise ValueError(f"seed must be null or an integer >= 0, got {self.seed}")
        self.loader = loader
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.data_on_device = data_on_device
        self.drop_last = drop_last
        self.augment = AugmentConfig.from_mapping(augment)
        self.cache_dir = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) if cache else None
        self.num_classes: int = DATASETS[self.dataset].num_classes
        self.classes: list[str] | None = None
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self._splits: dict[str, tuple[Tensor, Tensor]] = {}
        self._device_copies: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ trainer helpers

    # Read by the TensorLoaders this datamodule builds (their LoaderHost): the trainer's epoch, rank and
    # world size, the device of the splits.

    def _trainer_or_none(self) -> pl.Trainer | None:
        return self.trainer if getattr(self, "trainer", None) is not None else None

    def trainer_epoch(self) -> int | None:
        """The trainer's current epoch, or None without a trainer (a :class:`~maxdrop.data.loaders.LoaderHost`)."""
        t = self._trainer_or_none()
        return int(t.current_epoch) if t is not None else None

    def rank_world(self) -> tuple[int, int]:
        """(global rank, world size) of this process: (0, 1) without a trainer."""
        t = self._trainer_or_none()
        return (int(t.global_rank), int(t.world_size)) if t is not None else (0, 1)

    def per_device_batch_size(self) -> int:
        """The training batch of one process: ``global_batch_size / world_size`` when set, else ``batch_size``."""
        if self.global_batch_size is None:
            return self.batch_size
        world = self.rank_world()[1]
        if self.global_batch_size % world:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} does not divide over the world size {world} "
                f"(devices x num_nodes): use a multiple of {world}, or set a per-device batch_size instead"
            )
        return self.global_batch_size // world

    def on_device(self, t: Tensor) -> Tensor:
        """``t`` on the trainer's accelerator when ``data_on_device`` (copied once), else ``t``."""
        trainer = self._trainer_or_none()
        if not self.data_on_device or trainer is None:
            return t
        dev = trainer.strategy.root_device
        if dev.type == "cpu":
            return t
        key = (id(t), str(dev))
        if key not in self._device_copies:  # the entry keeps ``t`` alive, so its id cannot be reused
            self._device_copies[key] = (t, t.to(dev))
        return self._device_copies[key][1]

    # ------------------------------------------------------------------ data

    def prepare_data(self) -> None:
        """Download (if asked) and build the decode cache; Lightning runs this once per node."""
        if self.download:
            import torchvision.datasets as tvd

            cls = getattr(tvd, DATASETS[self.dataset].tv_class)
            for train in (True, False):
                cls(self.data_dir, train=train, download=True)
        if self.cache_dir is not None:
            load_or_decode(find_source(self.dataset, self.data_dir), self.dataset, self.cache_dir)

    def load(self) -> Decoded:
        """The whole dataset decoded (from the cache when valid)."""
        decoded, _ = load_or_decode(find_source(self.dataset, self.data_dir), self.dataset, self.cache_dir)
        return decoded

    def setup(self, stage: str | None = None) -> None:
        """Load the data and make the train/val split (every rank; cheap after the first call)."""
        destroy_process_group_at_exit()
        if self._splits:
            return
        d = self.load()
        n = len(d.train_labels)
        if self.val_size >= n:
            raise ValueError(f"val_size={self.val_size} must be smaller than the train split ({n} images)")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size].sort().values, perm[self.val_size :].sort().values
        if self.train_per_class is not None:
            train_idx = self._stratified_subset(train_idx, d.train_labels, d.classes)
        test = (d.test_images, d.test_labels)
        self._splits = {
            "train": (d.train_images[train_idx], d.train_labels[train_idx]),
            "val": (d.train_images[val_idx], d.train_labels[val_idx]) if self.val_size else test,
            "test": test,
        }
        self.classes = d.classes
        self.mean = torch.tensor(self.augment.mean, dtype=torch.float64) if self.augment.mean else d.mean.clone()
        self.std = torch.tensor(self.augment.std, dtype=torch.float64) if self.augment.std else d.std.clone()

    def _stratified_subset(self, pool: Tensor, labels: Tensor, classes: list[str]) -> Tensor:
        """``train_per_class`` indices of each class from ``pool`` (sorted indices into the train split).

        Each class is shuffled by its own generator seeded by (subset_seed, class), and its first
        ``train_per_class`` images are taken: the same images on every rank and resume, nested across sizes.
        """
        k, chosen = self.train_per_class, []
        for c in range(self.num_classes):
            members = pool[labels[pool] == c]
            if k > len(members):
                held = f" after the {self.val_size}-image validation split (val_size)" if self.val_size else ""
                raise ValueError(
                    f"train_per_class={k} is more than the {len(members)} training images of class "
                    f"{classes[c]!r}{held}: use at most {len(members)}, or null for the whole split"
                )
            g = torch.Generator().manual_seed(derive_seed(self.subset_seed, SUBSET_STREAM, c))
            chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
        return torch.cat(chosen).sort().values

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """(uint8 images (N, 3, 32, 32), int64 labels (N,)) of ``"train"``, ``"val"`` or ``"test"``."""
        if not self._splits:
            self.setup()
        return self._splits[name]

    # ------------------------------------------------------------------ loaders

    def _loader(self, name: str, train: bool) -> TensorLoader | DataLoader:
        images, labels = self.split(name)
        bs = self.per_device_batch_size() if train else self.eval_batch_size
        if self.loader == "tensor":
            return TensorLoader(self, images, labels, bs, shuffle=train, drop_last=train and self.drop_last)
        ds = UInt8Images(images, labels, image_transform(self.augment, self.mean.tolist(), self.std.tolist(), train))
        rank, world = self.rank_world()
        sampler = EvalShardSampler(ds, world, rank) if not train and world > 1 else None
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=train,
            sampler=sampler,
            drop_last=train and self.drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> TensorLoader | DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorLoader | DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorLoader | DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> TensorLoader | DataLoader:
        return self._loader("test", train=False)

    # ------------------------------------------------------------------ batch transform

    def transform_batch(self, batch: Any) -> Any:
        """A tensor-path :class:`RawBatch` -> ``(images float32 (N, 3, 32, 32), labels int64 (N,))`` on its
        device (augmented if it carries params); other batches pass unchanged."""
        if isinstance(batch, RawBatch):
            if self.mean is None:
                self.setup()
            return apply_batch(batch.images, batch.params, self.augment, self.mean, self.std), batch.labels
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.transform_batch(batch)
