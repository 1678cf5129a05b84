"""Where each dropout slot shuts units off: one image grid per slot in TensorBoard's IMAGES tab.

:class:`DropMaskImages` is a Lightning callback. Every ``every_n_epochs`` training epochs and at the
end of fit it runs a fixed set of K validation images (chosen once by seed) through a private copy of
the backbone, on global rank 0 only, and writes per slot one grid: the images, the slot's input as a
per-position map, and the fraction of the slot's channels its layer dropped at each position. Training
is untouched: the copy has its own parameters, buffers and counters, no other callback's hooks, and
every random-number generator is restored afterwards (``docs/monitoring.md``, "Drop-mask images").
"""

from __future__ import annotations

import copy
import io
import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from maxdrop.callbacks.sparsity import find_dropout_slots

__all__ = ["DropMaskImages", "drop_map", "input_map"]

#: Tag prefix of the images (``drop_masks/<slot>``).
TAG = "drop_masks"
#: The legend every image's tag carries as its TensorBoard description.
LEGEND = (
    "Columns: {k} fixed validation images (the same at every step). Row 1 (image): the image. Row 2 (input): the "
    "slot's input averaged over its channels at each position, scaled per image from its minimum (dark blue) to "
    "its maximum (yellow); it is MaxDropoutV2's channel sum up to the factor C, so MaxDropoutV2 drops the "
    "positions above 1 - p of this scale. Row 3 (dropped): of the channels active (nonzero) at that position, the "
    "fraction the layer set to zero, on a fixed scale: black = none, red = a few, yellow = all of them (any "
    "nonzero fraction is red at least, so that a single dropped unit shows); random layers show one draw. "
    "Backbone in eval mode (BatchNorm running statistics), slot layers in training mode, the {k} images in one "
    "batch (MaxDropout scope=tensor normalizes over these {k}). {cell}"
)
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


def _labelled_png(rgb: np.ndarray, labels: list[str], row_height: int, bar_label: str) -> tuple[bytes, tuple[int, int]]:
    """PNG of ``rgb`` with a white margin on the left holding one label per row, and ``bar_label``
    under the last row (the colour bar)."""
    from PIL import Image, ImageDraw

    margin = 64
    h, w, _ = rgb.shape
    img = Image.new("RGB", (w + margin, h + 14), "white")
    img.paste(Image.fromarray(rgb), (margin, 0))
    draw = ImageDraw.Draw(img)
    for r, text in enumerate(labels):
        draw.text((4, r * row_height + row_height // 2 - 5), text, fill="black")
    draw.text((margin + 2, h + 1), bar_label, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img.size


def _image_summary(tag: str, png: bytes, size: tuple[int, int], description: str) -> Any:
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


class _RngFence:
    """Restores torch (CPU and the given CUDA device), numpy and Python random states on exit."""

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
        self._fork = torch.random.fork_rng(devices=devices)

    def __enter__(self) -> None:
        self._np, self._py = np.random.get_state(), random.getstate()
        self._fork.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
        np.random.set_state(self._np)
        random.setstate(self._py)


def _private_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for a forward that must leave no trace on it.

    Every module of the tree is copied shallowly, with its own buffers (cloned: BatchNorm statistics
    and the like), its own tensor attributes (cloned: the maxdrop layers' drop counters), its own
    mode flag and no hooks (another callback's hooks must not see the forward). Parameters are shared,
    not copied: a forward under ``torch.no_grad`` only reads them. Nothing else is deep-copied, so
    attributes such as the slot factories (which may hold locks) are simply shared.
    """
    twin = copy.copy(module)
    state = twin.__dict__
    for key, value in list(state.items()):
        if "hook" in key and isinstance(value, dict):
            state[key] = type(value)()
        elif isinstance(value, Tensor):
            state[key] = value.detach().clone()
    state["_parameters"] = dict(module._parameters)
    state["_buffers"] = {k: None if b is None else b.detach().clone() for k, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = {k: None if m is None else _private_copy(m) for k, m in module._modules.items()}
    state.pop("_compiled_call_impl", None)  # nn.Module.compile() state: run the copy eagerly
    return twin


class DropMaskImages(pl.Callback):
    """Writes, per dropout slot, an image of which positions its layer drops on K fixed validation images.

    Tag ``drop_masks/<slot>`` in TensorBoard's IMAGES tab (one grid per slot and write; the tag's
    description holds the legend). Columns: the K images. Rows: the image; the slot's input averaged over
    its channels at each position (:func:`input_map`; per image from its min to its max, viridis); of the
    channels active there (nonzero input), the share that left zero (:func:`drop_map`; fixed scale: 0
    black, above 0 red through yellow at 1). For an (N, D) slot (``head``) each of the D features is one
    cell of a near-square grid (grey = padding). Random layers (``nn.Dropout``, DropBlock) show one draw.

    How, so that training is untouched (a run ends bitwise equal with the images on or off): on global
    rank 0 alone, with no collective call, a copy of ``pl_module.backbone`` (parameters shared; its own
    buffers, layer counters and mode flags; no hooks) runs in eval mode with only its slot layers in training mode
    (BatchNorm and SyncBatchNorm use their running statistics and do not communicate; slot layers with
    ``scope="global"`` run as ``"tensor"``, which is what one process computes), under ``torch.no_grad``,
    inside a fence that restores the torch (CPU and CUDA), numpy and Python random states. The images
    come from the datamodule's validation split (``datamodule.split("val")``, maxdrop's
    :class:`~maxdrop.data.CIFARDataModule`) or else from the dataset of the first validation dataloader.

    Args:
        every_n_epochs: write after every this many training epochs (and always at the end of fit);
            0 writes only at the end of fit.
        num_images: K, the number of validation images (columns).
        seed: seed of the choice of the K images (made once, the same in every write).
        cell: edge in pixels of one cell of the grid (maps are enlarged by whole factors).
        enabled: False turns the callback off (the single switch the shipped configs document).

    Raises:
        ValueError: ``every_n_epochs`` < 0, ``num_images`` < 1, ``cell`` < 8, or a non-int where an
            int is expected.
    """

    def __init__(
        self, every_n_epochs: int = 5, num_images: int = 8, seed: int = 0, cell: int = 64, enabled: bool = True
    ) -> None:
        super().__init__()
        for name, value, lo in (
            ("every_n_epochs", every_n_epochs, 0),
            ("num_images", num_images, 1),
            ("cell", cell, 8),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"DropMaskImages: {name} must be an int >= {lo}, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"DropMaskImages: seed must be an int >= 0, got {seed!r}")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self.cell = cell
        self.enabled = bool(enabled)
        #: ``{slot: reason}`` of the slots that got no image in the last write.
        self.skipped: dict[str, str] = {}
        self._images: tuple[Tensor, Tensor] | None = None  # (model input, display in [0, 1]), on the CPU
        self._last_step: int | None = None
        self._off_reason: str | None = None

    # ---------------------------------------------------------------- the K images

    def _pick(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=g)[: min(self.num_images, n)].sort().values

    def _choose_images(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        """(model input float32 (K, 3, H, W), display float32 (K, 3, H, W) in [0, 1]) on the CPU."""
        dm = trainer.datamodule
        if dm is not None and callable(getattr(dm, "split", None)) and callable(getattr(dm, "transform_batch", None)):
            from maxdrop.data import RawBatch

            images, labels = dm.split("val")
            idx = self._pick(len(labels))
            raw, lab = images[idx], labels[idx]
            x, _ = dm.transform_batch(RawBatch(raw, lab, None))
            return x.float().cpu(), raw.float().div(255).cpu()
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise LookupError(
                "no validation images: the datamodule has no split('val') and the validation dataloader "
                "no map-style dataset"
            )
        items = [dataset[int(i)] for i in self._pick(len(dataset))]
        x = torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items]).float()
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return x, (x - lo) / (hi - lo).clamp_min(1e-12)  # min-max per image for display

    # ---------------------------------------------------------------- the forward

    @staticmethod
    def _record(backbone: nn.Module, x: Tensor) -> tuple[dict[str, tuple[Tensor, Tensor, str]], dict[str, str]]:
        """Runs ``backbone`` (a private copy) on ``x``; returns ``{slot: (input map, drop map, what a
        cell is)}`` and ``{slot: reason}`` for the slots without a picture."""
        slots = find_dropout_slots(backbone) or {}
        maps: dict[str, tuple[Tensor, Tensor, str]] = {}
        skipped: dict[str, str] = {}
        pending: dict[str, Tensor] = {}
        handles = []
        backbone.eval()
        for name, layer in slots.items():
            layer.train()
            if getattr(layer, "scope", None) == "global":
                layer.scope = "tensor"  # one process: the same min/max, and no all-reduce

            def pre(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                if args and isinstance(args[0], Tensor):
                    pending[name] = args[0].clone()  # before an in-place layer overwrites it

            def post(module: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
                y = out[0] if isinstance(out, (tuple, list)) and out else out
                x_in = pending.pop(name, None)
                if x_in is None or not isinstance(y, Tensor):
                    skipped[name] = "its layer was not called with a tensor"
                    return
                m, d = input_map(x_in), drop_map(x_in, y)
                if m is None or d is None:
                    skipped[name] = f"input {tuple(x_in.shape)} -> output {tuple(y.shape)} has no positions to map"
                    return
                if x_in.ndim == 4:
                    cell = f"The slot's input is (K, {', '.join(map(str, x_in.shape[1:]))}): one cell per position."
                else:
                    cell = (
                        f"The slot's input {tuple(x_in.shape)} has no 2-D positions: each cell is one of its "
                        f"{x_in.shape[1] if x_in.ndim == 2 else math.prod(x_in.shape[2:])} "
                        f"{'features' if x_in.ndim == 2 else 'positions'} (grey: padding)."
                    )
                maps[name] = (m.cpu(), d.cpu(), cell)
                skipped.pop(name, None)

            handles += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
        try:
            with torch.no_grad():
                backbone(x)
        finally:
            for h in handles:
                h.remove()
        for name in slots:
            if name not in maps:
                skipped.setdefault(name, "its layer was not called in the forward")
        return maps, skipped

    def write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Writes one grid per slot at the current global step (global rank 0; no-op elsewhere)."""
        if not trainer.is_global_zero or self._off_reason is not None:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        backbone = getattr(pl_module, "backbone", None)
        if not writers:
            return self._turn_off("the trainer has no TensorBoardLogger")
        if not isinstance(backbone, nn.Module) or find_dropout_slots(backbone) is None:
            return self._turn_off("the LightningModule has no `backbone` with a dropout_slots() method")
        if not find_dropout_slots(backbone):  # a baseline without dropout: nothing to show, quietly
            self._off_reason = "the backbone has no filled dropout slot"
            return rank_zero_info(f"DropMaskImages: {self._off_reason}; no drop-mask images.")
        step = trainer.global_step
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else pl_module.device
        with _RngFence(device):
            try:
                if self._images is None:
                    self._images = self._choose_images(trainer)
                x, shown = self._images
                twin = _private_copy(backbone)
                maps, self.skipped = self._record(twin, x.to(device, param.dtype if param is not None else None))
                del twin
            except Exception as err:  # a picture must never end a training run
                return self._turn_off(f"{type(err).__name__}: {err}")
        for name, (m, d, cell) in maps.items():
            rgb = compose_grid(shown, m, d, self.cell)
            png, size = _labelled_png(rgb, ROW_LABELS, self.cell + 2, BAR_LABEL)
            summary = _image_summary(f"{TAG}/{name}", png, size, LEGEND.format(k=len(shown), cell=cell))
            for w in writers:
                w._get_file_writer().add_summary(summary, step)
        for w in writers:
            w.flush()
        self._last_step = step

    def _turn_off(self, reason: str) -> None:
        self._off_reason = reason
        rank_zero_warn(f"DropMaskImages: writing no drop-mask images in this run: {reason}")

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._last_step = None
        self._off_reason = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self.write(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The end of fit (the last epoch, max_steps, or a stop): unless this step was just written.
        if self.enabled and self._last_step != trainer.global_step:
            self.write(trainer, pl_module)
