"""CIFAR-10/100 data: sources, decode cache, augmentations and the LightningDataModule."""

from maxdrop.data.augment import AugmentConfig, Cutout, apply_batch, image_transform, sample_params
from maxdrop.data.cache import default_cache_dir, load_or_decode
from maxdrop.data.cifar import LOADERS, CIFARDataModule, RawBatch, TensorLoader
from maxdrop.data.sources import DATASETS, DataSourceError, Decoded, Source, decode_source, find_source

__all__ = [
    "DATASETS",
    "LOADERS",
    "AugmentConfig",
    "CIFARDataModule",
    "Cutout",
    "DataSourceError",
    "Decoded",
    "RawBatch",
    "Source",
    "TensorLoader",
    "apply_batch",
    "decode_source",
    "default_cache_dir",
    "find_source",
    "image_transform",
    "load_or_decode",
    "sample_params",
]
