"""Pictures of where a dropout slot drops: per-position maps of its input and of its dropped units,
rendered into one labelled grid and a TensorBoard image summary (used by :class:`DropMaskImages`)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["BAR_LABEL", "ROW_LABELS", "compose_grid", "drop_map", "image_summary", "input_map", "labelled_png"]

#: Labels of the grid's rows and of its colour bar, drawn into the image.
ROW_LABELS = ["image", "input", "dropped"]
BAR_LABEL = "dropped share of the active channels: 0 (black), > 0 (red) .. 1 (yellow)"
_GREY = 0.5  # fill of cells beyond the last feature of a flattened (N, D) input


def _as_positions(x: Tensor) -> Tensor | None:
    """(N, C, H, W) view of a slot tensor: (N, C, H, W) as is, (N, D) as D one-channel positions on a
    near-square grid (padded with NaN), (N, C, L...) with its positions flattened the same way; None
    for fewer than 2 dims."""
    if x.ndim < 2:
        return None
    if x.ndim == 4:
        return x.float()
    flat = x.float().reshape(x.shape[0], 1, -1) if x.ndim == 2 else x.float().flatten(2)
    n, c, length = flat.shape
    width = math.ceil(math.sqrt(length))
    height = math.ceil(length / width)
    pad = flat.new_full((n, c, height * width - length), float("nan"))
    return torch.cat([flat, pad], 2).view(n, c, height, width)


def input_map(x: Tensor) -> Tensor | None:
    """Per-position map of a slot's input: the mean over channels.

    Args:
        x: the slot's input, (N, C, H, W), (N, D) (each feature its own position) or (N, C, L...).

    Returns:
        float32 (N, H, W) (NaN in the padding of a flattened input), or None for an input with fewer
        than 2 dims.
    """
    v = _as_positions(x)
    return None if v is None else v.mean(1)


def drop_map(x: Tensor, y: Tensor) -> Tensor | None:
    """Fraction of the active channels that the layer dropped at each position.

    A unit is active when its input is nonzero and dropped when its input is nonzero and its output
    exactly zero, so the map does not depend on what the layer does with units that are already zero
    (half of a post-ReLU map): ``MaxDropoutV2`` and Top DropBlock read 1 at the positions they drop,
    ``nn.Dropout(p)`` about p everywhere, ``Dropout2d`` the share of the active channels it dropped.

    Args:
        x: the slot's input, (N, C, H, W), (N, D) or (N, C, L...).
        y: the slot's output, same shape.

    Returns:
        float32 (N, H, W) in [0, 1]: dropped / active channels, 0 where no channel is active (NaN in
        the padding of a flattened input); None when the shapes differ or the input has fewer than
        2 dims.
    """
    if x.shape != y.shape:
        return None
    active = _as_positions((x != 0).float())
    if active is None:
        return None
    dropped = _as_positions(((x != 0) & (y == 0)).float()).sum(1)
    # Padding is NaN in every channel, so it stays NaN.
    return dropped / active.sum(1).clamp_min(1)


def _colour(values: Tensor, cmap: str, lo: Tensor | float, hi: Tensor | float) -> Tensor:
    """(N, H, W) values -> float32 (N, H, W, 3) RGB in [0, 1] through a matplotlib colour map scaled
    from ``lo`` to ``hi`` (per image when tensors of shape (N, 1, 1)); NaN -> grey."""
    from matplotlib import colormaps

    lut = torch.tensor(colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3], dtype=torch.float32)
    span = torch.as_tensor(hi) - torch.as_tensor(lo)
    scaled = (values - lo) / torch.where(span > 0, span, torch.ones_like(span))
    idx = (scaled.nan_to_num(0.0).clamp(0, 1) * 255).round().long()
    rgb = lut[idx]
    return rgb.masked_fill(values.isnan()[..., None], _GREY)


def _drop_colour(fraction: Tensor) -> Tensor:
    """Fixed scale of the dropped share: exactly 0 black, (0, 1] red to yellow (matplotlib's autumn),
    so that a position where a single unit was dropped stands out; NaN (padding) grey."""
    rgb = _colour(fraction, "autumn", 0.0, 1.0)
    return rgb.masked_fill((fraction == 0)[..., None], 0.0)


def _upscale(rgb: Tensor, size: int) -> Tensor:
    """(N, h, w, 3) -> (N, size, size', 3) by nearest-neighbour repetition (no smoothing of the masks)."""
    n, h, w, _ = rgb.shape
    f = max(1, size // max(h, w))
    return rgb.repeat_interleave(f, 1).repeat_interleave(f, 2)


def compose_grid(images: Tensor, x_map: Tensor, d_map: Tensor, cell: int = 64) -> np.ndarray:
    """One grid image: K columns; rows image / input map / dropped fraction, then a 0..1 colour bar.

    Args:
        images: float32 (K, 3, H, W) display images in [0, 1].
        x_map: (K, h, w) input map (:func:`input_map`).
        d_map: (K, h, w) dropped fraction (:func:`drop_map`).
        cell: edge of one cell in pixels (maps are enlarged by whole factors up to it).

    Returns:
        uint8 (height, width, 3) RGB.
    """
    lo = torch.from_numpy(np.nanmin(x_map.numpy(), axis=(1, 2)))[:, None, None]
    hi = torch.from_numpy(np.nanmax(x_map.numpy(), axis=(1, 2)))[:, None, None]
    rows = [
        _upscale(images.permute(0, 2, 3, 1).clamp(0, 1), cell),
        _upscale(_colour(x_map, "viridis", lo, hi), cell),
        _upscale(_drop_colour(d_map), cell),
    ]
    gap, k = 2, images.shape[0]
    width = k * (cell + gap) + gap
    bar_h = 10
    canvas = torch.ones(3 * (cell + gap) + gap + bar_h + gap, width, 3)
    for r, row in enumerate(rows):
        for i in range(k):
            tile = row[i]
            top, left = gap + r * (cell + gap), gap + i * (cell + gap)
            canvas[top : top + tile.shape[0], left : left + tile.shape[1]] = tile
    bar = torch.linspace(0, 1, width - 2 * gap)[None, :].expand(bar_h, -1)
    top = 3 * (cell + gap) + gap
    canvas[top : top + bar_h, gap : width - gap] = _drop_colour(bar)
    return (canvas * 255).round().to(torch.uint8).numpy()


def labelled_png(rgb: np.ndarray, row_height: int) -> tuple[bytes, tuple[int, int]]:
    """PNG of a :func:`compose_grid` image with a white margin on the left naming its rows
    (:data:`ROW_LABELS`) and the colour bar's legend (:data:`BAR_LABEL`) under it.

    Returns:
        (PNG bytes, (width, height)).
    """
    from PIL import Image, ImageDraw

    margin = 64
    h, w, _ = rgb.shape
    img = Image.new("RGB", (w + margin, h + 14), "white")
    img.paste(Image.fromarray(rgb), (margin, 0))
    draw = ImageDraw.Draw(img)
    for r, text in enumerate(ROW_LABELS):
        draw.text((4, r * row_height + row_height // 2 - 5), text, fill="black")
    draw.text((margin + 2, h + 1), BAR_LABEL, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img.size


def image_summary(tag: str, png: bytes, size: tuple[int, int], description: str) -> Any:
    """A TensorBoard image summary (the images plugin's tensor form: width, height, PNG) whose
    metadata carries ``description`` (the legend TensorBoard shows with the tag)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.image.metadata import create_summary_metadata

    tensor = TensorProto(
        dtype="DT_STRING",
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=3)]),
        string_val=[str(size[0]).encode(), str(size[1]).encode(), png],
    )
    metadata = create_summary_metadata(display_name=tag, description=description)
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])
