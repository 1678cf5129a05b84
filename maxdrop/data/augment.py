"""The paper's CIFAR augmentations, batched (tensor path) and per image (torchvision transforms v2 path).

Order, in both paths: random crop with zero padding + horizontal flip (on uint8), conversion to float
and normalization with the dataset's mean/std, Cutout, RandomErasing (both on the normalized tensor, as
in DeVries & Taylor's and torchvision's pipelines, so erased pixels are 0 = the dataset mean).

Batched: the random parameters of a batch (crop offsets, flips, hole centres, erasing boxes) are drawn
on the CPU from a generator the caller seeds (:func:`sample_params`, a few hundred numbers per batch),
then :func:`apply_batch` applies them on whatever device the uint8 batch is on, with one gather for crop
and flip and one masked fill per erasing kind: no per-image Python work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maxdrop.utils.threads import one_cpu_thread

__all__ = ["AugmentConfig", "Cutout", "apply_batch", "image_transform", "one_cpu_thread", "sample_params"]


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings (the ``augment`` mapping of :class:`~maxdrop.data.CIFARDataModule`).

    Attributes:
        crop_padding: zero padding on each side before a random 32x32 crop; 0 disables the crop.
        hflip: random horizontal flip with probability 0.5.
        cutout_holes: number of Cutout squares per image (DeVries & Taylor 2017); 0 disables Cutout.
        cutout_length: side of a Cutout square in pixels (centre uniform over the image, clipped at the
            border; as in the reference code the square spans ``[c - length // 2, c + length // 2)``).
        erasing_p: probability of torchvision's RandomErasing per image; 0 disables it.
        erasing_scale: (min, max) erased area as a fraction of the image.
        erasing_ratio: (min, max) aspect ratio of the erased box.
        erasing_value: value written into erased pixels (in normalized units: 0 = the dataset mean).
        normalize: subtract the per-channel mean and divide by the std; otherwise images are in [0, 1].
        mean: per-channel mean in [0, 1]; None = the train split's own (computed at decode time).
        std: per-channel std in [0, 1]; None = the train split's own.
    """

    crop_padding: int = 4
    hflip: bool = True
    cutout_holes: int = 0
    cutout_length: int = 16
    erasing_p: float = 0.0
    erasing_scale: tuple[float, float] = (0.02, 0.33)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)
    erasing_value: float = 0.0
    normalize: bool = True
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> ValueError:
            return ValueError(f"augment.{key} = {getattr(self, key)!r} is invalid; allowed: {allowed}")

        for key in ("crop_padding", "cutout_holes", "cutout_length"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "cutout_length" else 0):
                raise bad(key, "an integer >= 1" if key == "cutout_length" else "an integer >= 0")
        for key in ("hflip", "normalize"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        if not _is_real(self.erasing_p) or not 0.0 <= self.erasing_p <= 1.0:
            raise bad("erasing_p", "a probability in [0, 1]")
        if not _is_real(self.erasing_value) or not math.isfinite(self.erasing_value):
            raise bad("erasing_value", "a finite number")
        for key, hi in (("erasing_scale", 1.0), ("erasing_ratio", math.inf)):
            v = getattr(self, key)
            if not _is_pair(v) or not 0 < v[0] <= v[1] <= hi:
                raise bad(key, f"[min, max] with 0 < min <= max{' <= 1' if hi == 1.0 else ''}")
            object.__setattr__(self, key, (float(v[0]), float(v[1])))
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is None:
                continue
            if not (isinstance(v, Sequence) and len(v) == 3 and all(_is_real(t) and math.isfinite(t) for t in v)):
                raise bad(key, "null or three numbers (R, G, B) in [0, 1] units")
            if key == "std" and min(v) <= 0:
                raise bad(key, "three positive numbers")
            object.__setattr__(self, key, tuple(float(t) for t in v))

    @classmethod
    def from_mapping(cls, augment: Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig:
        """Build from a YAML mapping: given keys override the defaults; an unknown key raises ``ValueError``."""
        if augment is None:
            return cls()
        if isinstance(augment, AugmentConfig):
            return augment
        if not isinstance(augment, Mapping):
            raise ValueError(f"augment must be a mapping of settings, got {type(augment).__name__}: {augment!r}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in augment if k not in known]
        if unknown:
            raise ValueError(f"unknown augment key(s) {unknown}; allowed: {', '.join(known)}")
        return cls(**augment)


def _is_real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_pair(v: object) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, str) and len(v) == 2 and all(_is_real(t) for t in v)


# --------------------------------------------------------------------------- batched


def sample_params(
    cfg: AugmentConfig, n: int, generator: torch.Generator | None = None, size: tuple[int, int] = (32, 32)
) -> dict[str, Tensor]:
    """Draw the random parameters of one batch on the CPU.

    Args:
        cfg: augmentation settings.
        n: batch size.
        generator: CPU generator (None: torch's global RNG).
        size: (H, W) of the images.

    Returns:
        Dict of CPU tensors, only for the enabled augmentations: ``crop`` int64 (n, 2) offsets (y, x) into
        the padded image; ``flip`` bool (n,); ``cutout`` int64 (n, holes, 2) centres (y, x); ``erase`` int64
        (n, 4) boxes (top, left, height, width), height 0 = not erased.
    """
    H, W = size
    g = generator
    p: dict[str, Tensor] = {}
    if cfg.crop_padding > 0:
        p["crop"] = torch.randint(0, 2 * cfg.crop_padding + 1, (n, 2), generator=g)
    if cfg.hflip:
        p["flip"] = torch.rand(n, generator=g) < 0.5
    if cfg.cutout_holes > 0:
        cy = torch.randint(0, H, (n, cfg.cutout_holes), generator=g)
        cx = torch.randint(0, W, (n, cfg.cutout_holes), generator=g)
        p["cutout"] = torch.stack([cy, cx], dim=-1)
    if cfg.erasing_p > 0:
        p["erase"] = _erasing_boxes(cfg, n, g, H, W)
    return p


def _erasing_boxes(cfg: AugmentConfig, n: int, g: torch.Generator | None, H: int, W: int) -> Tensor:
    """torchvision's RandomErasing.get_params, for n images at once (10 attempts each, first fitting one)."""
    apply = torch.rand(n, generator=g) < cfg.erasing_p
    attempts = 10
    area = torch.empty(n, attempts, dtype=torch.float64).uniform_(*cfg.erasing_scale, generator=g) * (H * W)
    log_ratio = torch.empty(n, attempts, dtype=torch.float64).uniform_(
        math.log(cfg.erasing_ratio[0]), math.log(cfg.erasing_ratio[1]), generator=g
    )
    ratio = log_ratio.exp()
    h = (area * ratio).sqrt().round().long()
    w = (area / ratio).sqrt().round().long()
    fits = (h < H) & (w < W)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = (torch.rand(n, generator=g, dtype=torch.float64) * (H - h + 1)).floor().long()
    left = (torch.rand(n, generator=g, dtype=torch.float64) * (W - w + 1)).floor().long()
    keep = apply & fits.any(dim=1)
    return torch.stack([top, left, h * keep, w * keep], dim=1)


def _crop_flip(x: Tensor, crop: Tensor | None, flip: Tensor | None, padding: int) -> Tensor:
    """Random crop (zero padding) and flip of (N, C, H, W) in one gather; any dtype."""
    N, C, H, W = x.shape
    dev = x.device
    if crop is not None and padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
        oy, ox = crop[:, 0:1], crop[:, 1:2]
    else:
        oy = ox = torch.zeros(N, 1, dtype=torch.long, device=dev)
    PW = x.shape[-1]
    rows = oy + torch.arange(H, device=dev)  # (N, H)
    cols = ox + torch.arange(W, device=dev)  # (N, W)
    if flip is not None:
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx = (rows[:, :, None] * PW + cols[:, None, :]).reshape(N, 1, H * W).expand(N, C, H * W)
    return x.reshape(N, C, -1).gather(2, idx).reshape(N, C, H, W)


def _box_mask(top: Tensor, bottom: Tensor, left: Tensor, right: Tensor, H: int, W: int) -> Tensor:
    """Bool (..., H, W): True inside [top, bottom) x [left, right), for boxes of shape (...)."""
    r = torch.arange(H, device=top.device)
    c = torch.arange(W, device=top.device)
    rm = (r >= top[..., None]) & (r < bottom[..., None])
    cm = (c >= left[..., None]) & (c < right[..., None])
    return rm[..., :, None] & cm[..., None, :]


def cutout_mask(centres: Tensor, length: int, size: tuple[int, int]) -> Tensor:
    """Bool (N, H, W) of the pixels Cutout zeroes, for centres int64 (N, holes, 2) (y, x)."""
    H, W = size
    half = length // 2
    cy, cx = centres[..., 0], centres[..., 1]
    top, bottom = (cy - half).clamp(0, H), (cy + half).clamp(0, H)
    left, right = (cx - half).clamp(0, W), (cx + half).clamp(0, W)
    return _box_mask(top, bottom, left, right, H, W).any(dim=1)


def apply_batch(
    images: Tensor, params: Mapping[str, Tensor] | None, cfg: AugmentConfig, mean: Tensor, std: Tensor
) -> Tensor:
    """Augment (if ``params``) and normalize a uint8 batch on its own device.

    Args:
        images: uint8 (N, 3, H, W).
        params: from :func:`sample_params` (any device; moved to ``images``' device); None = no augmentation
            (evaluation).
        cfg: the settings the params were drawn for.
        mean: per-channel mean in [0, 1], (3,).
        std: per-channel std in [0, 1], (3,).

    Returns:
        float32 (N, 3, H, W).
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    with one_cpu_thread(images.device.type == "cpu"):
        return _apply(images, params or {}, cfg, mean, std)


def _apply(images: Tensor, params: Mapping[str, Tensor], cfg: AugmentConfig, mean: Tensor, std: Tensor) -> Tensor:
    dev = images.device
    H, W = images.shape[-2:]
    params = {k: v.to(dev, non_blocking=True) for k, v in params.items()}
    x = images
    if "crop" in params or "flip" in params:
        x = _crop_flip(x, params.get("crop"), params.get("flip"), cfg.crop_padding)
    x = x.to(torch.float32)
    if cfg.normalize:
        std = std.to(dev, torch.float32)
        x.mul_((1.0 / (255.0 * std)).view(1, -1, 1, 1)).sub_((mean.to(dev, torch.float32) / std).view(1, -1, 1, 1))
    else:
        x.mul_(1.0 / 255.0)
    # Cutout and erasing as one multiplication by a keep-mask (a broadcast masked_fill_ is ~4x slower).
    drop = cutout_mask(params["cutout"], cfg.cutout_length, (H, W)) if "cutout" in params else None
    erased = None
    if "erase" in params:
        t, lft, h, w = params["erase"].unbind(1)
        erased = _box_mask(t, t + h, lft, lft + w, H, W)
        drop = erased if drop is None else drop | erased
    if drop is not None:
        x.mul_((~drop).to(x.dtype)[:, None])
    if erased is not None and cfg.erasing_value != 0:
        x.add_(erased.to(x.dtype)[:, None], alpha=cfg.erasing_value)
    return x


# --------------------------------------------------------------------------- per image (DataLoader path)


class Cutout(nn.Module):
    """Cutout (DeVries & Taylor 2017) as a torchvision-v2-style transform, on a (C, H, W) or (N, C, H, W) tensor.

    Draws the centres from torch's global RNG (seeded per DataLoader worker by torch/Lightning).

    Args:
        holes: squares per image.
        length: side of a square in pixels.
        value: fill value.
    """

    def __init__(self, holes: int = 1, length: int = 16, value: float = 0.0) -> None:
        super().__init__()
        self.holes, self.length, self.value = holes, length, value

    def forward(self, img: Tensor) -> Tensor:
        batch = img if img.ndim == 4 else img[None]
        H, W = batch.shape[-2:]
        centres = torch.stack(
            [torch.randint(0, H, (batch.shape[0], self.holes)), torch.randint(0, W, (batch.shape[0], self.holes))], -1
        )
        out = batch.masked_fill(cutout_mask(centres.to(img.device), self.length, (H, W))[:, None], self.value)
        return out if img.ndim == 4 else out[0]

    def extra_repr(self) -> str:
        return f"holes={self.holes}, length={self.length}"


def image_transform(cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float], train: bool) -> nn.Module:
    """torchvision transforms v2 pipeline for one uint8 (3, H, W) image -> float32 (3, H, W)."""
    from torchvision.transforms import v2

    size = 32
    t: list[nn.Module] = []
    if train and cfg.crop_padding > 0:
        t.append(v2.RandomCrop(size, padding=cfg.crop_padding))
    if train and cfg.hflip:
        t.append(v2.RandomHorizontalFlip())
    t.append(v2.ToDtype(torch.float32, scale=True))
    if cfg.normalize:
        t.append(v2.Normalize(list(mean), list(std)))
    if train and cfg.cutout_holes > 0:
        t.append(Cutout(cfg.cutout_holes, cfg.cutout_length))
    if train and cfg.erasing_p > 0:
        t.append(v2.RandomErasing(cfg.erasing_p, cfg.erasing_scale, cfg.erasing_ratio, cfg.erasing_value))
    return v2.Compose(t)
