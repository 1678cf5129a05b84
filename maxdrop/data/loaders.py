"""Batch sources of :class:`~maxdrop.data.CIFARDataModule`: the whole-split tensor loader (stateful, so a
run resumes with the next batch), the per-image dataset of the DataLoader path and the eval shard sampler."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from maxdrop.data.augment import sample_params
from maxdrop.utils.threads import one_cpu_thread

if TYPE_CHECKING:
    from maxdrop.data.augment import AugmentConfig

__all__ = ["EvalShardSampler", "LoaderHost", "RawBatch", "TensorLoader", "UInt8Images", "derive_seed"]

# Streams of the (seed, epoch, rank, ...) seed derivation; fixed forever so that runs stay reproducible.
SHUFFLE_STREAM, AUGMENT_STREAM, SUBSET_STREAM = 1, 2, 3


def derive_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class RawBatch(NamedTuple):
    """What the tensor path's loaders yield; ``CIFARDataModule.on_after_batch_transfer`` turns it into
    ``(images, labels)``.

    Attributes:
        images: uint8 (N, 3, 32, 32), not yet augmented or normalized.
        labels: int64 (N,).
        params: augmentation parameters of this batch (:func:`maxdrop.data.augment.sample_params`);
            None for evaluation batches.
    """

    images: Tensor
    labels: Tensor
    params: dict[str, Tensor] | None


class LoaderHost(Protocol):
    """What a :class:`TensorLoader` reads from its owner (the :class:`~maxdrop.data.CIFARDataModule`) each
    time it iterates: settings, and the trainer's state, which is not known when the loader is built."""

    seed: int
    augment: AugmentConfig
    pin_memory: bool

    def trainer_epoch(self) -> int | None:
        """The trainer's current epoch, None without a trainer."""

    def rank_world(self) -> tuple[int, int]:
        """(global rank, world size)."""

    def on_device(self, t: Tensor) -> Tensor:
        """``t`` where the batches are gathered (the accelerator when the data lives there)."""


class TensorLoader:
    """Batches of a split held as one uint8 tensor, sharded over DDP ranks by the loader itself.

    Train (``shuffle=True``): each epoch, one permutation of the split drawn from a generator seeded by
    (seed, epoch) (the same on every rank), padded by wrapping around to a multiple of the world size
    (as ``DistributedSampler`` does), and rank r takes every world_size-th index from r. Every rank
    therefore yields the same number of batches, and every sample is seen at least once per epoch
    (exactly once when the split divides by the world size). Augmentation parameters of batch b come
    from a generator seeded by (seed, epoch, rank, b): nothing depends on global RNG state, so epoch k's
    batches are identical whether training ran straight or resumed at k.

    Eval (``shuffle=False``): rank r takes samples r, r + world_size, ... (each sample exactly once
    across ranks, no padding), cut into the same number of batches on every rank.

    The epoch is read from the trainer when iteration starts (``trainer.current_epoch``); without a
    trainer it is the value given to :meth:`set_epoch`, else the number of iterations started so far.
    """

    def __init__(
        self,
        datamodule: LoaderHost,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        drop_last: bool = False,
    ) -> None:
        self.dm = datamodule
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self._epoch: int | None = None
        self._iterations = 0
        self._skip = (-1, 0)  # (epoch, batches) to skip at the next iteration (mid-epoch resume)
        self._yielded = 0
        self._iter_epoch = 0

    # -- epoch, rank, resume

    def set_epoch(self, epoch: int) -> None:
        """Pin the epoch used for shuffling and augmentation (only needed without a trainer)."""
        self._epoch = int(epoch)

    def _current_epoch(self) -> int:
        epoch = self.dm.trainer_epoch()
        if epoch is not None:
            return epoch
        return self._epoch if self._epoch is not None else self._iterations

    def state_dict(self) -> dict[str, int]:
        """Position in the current epoch (Lightning stores it in checkpoints for mid-epoch resume)."""
        return {"epoch": self._iter_epoch, "batches": self._yielded}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Make the next iteration skip the batches the saved run had already consumed in that epoch."""
        self._skip = (int(state.get("epoch", -1)), int(state.get("batches", 0)))

    # -- indices

    def _indices(self, epoch: int, rank: int, world: int) -> list[Tensor]:
        n = len(self.labels)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.dm.seed, SHUFFLE_STREAM, epoch))
            perm = torch.randperm(n, generator=g)
            per_rank = math.ceil(n / world)
            if per_rank * world > n:  # wrap around so every rank gets the same count
                perm = perm.repeat(math.ceil(per_rank * world / n))[: per_rank * world]
            shard = perm[rank::world]
            batches = list(shard.split(self.batch_size))
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            return batches
        shard = torch.arange(rank, n, world)
        n_batches = math.ceil(math.ceil(n / world) / self.batch_size)
        batches = list(shard.split(self.batch_size))
        # A shard one sample short of the longest can end one batch early: split its last batch in two so
        # that all ranks run the same number of eval steps (collectives inside eval steps stay matched).
        if len(batches) == n_batches - 1 and batches and len(batches[-1]) >= 2:
            last = batches.pop()
            batches += list(last.tensor_split(2))
        return batches

    def __len__(self) -> int:
        rank, world = self.dm.rank_world()
        return len(self._indices(0, rank, world)) if not self.shuffle else self._train_len(world)

    def _train_len(self, world: int) -> int:
        per_rank = math.ceil(len(self.labels) / world)
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[RawBatch]:
        epoch = self._current_epoch()
        self._iterations += 1
        rank, world = self.dm.rank_world()
        images, labels = self.dm.on_device(self.images), self.dm.on_device(self.labels)
        pin = self.dm.pin_memory and images.device.type == "cpu" and torch.cuda.is_available()
        skip = self._skip[1] if self._skip[0] == epoch else 0
        self._skip = (-1, 0)
        self._iter_epoch, self._yielded = epoch, skip
        with one_cpu_thread():
            batches = self._indices(epoch, rank, world)
        for b, idx in enumerate(batches):
            if b < skip:
                continue
            with one_cpu_thread():  # never around the yield
                idx = idx.to(images.device, non_blocking=True)
                x, y = images.index_select(0, idx), labels.index_select(0, idx)
                if pin:
                    x, y = x.pin_memory(), y.pin_memory()
                params = None
                if self.shuffle:
                    g = torch.Generator().manual_seed(derive_seed(self.dm.seed, AUGMENT_STREAM, epoch, rank, b))
                    params = sample_params(self.dm.augment, len(idx), g, tuple(images.shape[-2:]))
            self._yielded = b + 1
            yield RawBatch(x, y, params)


class UInt8Images(Dataset):
    """Map-style dataset over uint8 (N, 3, H, W) images with a per-image transform."""

    def __init__(self, images: Tensor, labels: Tensor, transform: torch.nn.Module) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        from torchvision import tv_tensors

        return self.transform(tv_tensors.Image(self.images[i])).as_subclass(Tensor), self.labels[i]


class EvalShardSampler(DistributedSampler):
    """Rank r gets r, r + world, ...: every sample exactly once across ranks (no padding).

    A DistributedSampler subclass so that Lightning keeps it instead of injecting its own padded one.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
