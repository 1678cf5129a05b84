"""Where each dropout slot shuts units off: one image grid per slot in TensorBoard's IMAGES tab.

:class:`DropMaskImages` is a Lightning callback. Every ``every_n_epochs`` training epochs and at the
end of fit it runs a fixed set of K validation images (chosen once by seed) through a private copy of
the backbone, on global rank 0 only, and writes per slot one grid: the images, the slot's input as a
per-position map, and the share of the active channels its layer dropped at each position (maps and
rendering in :mod:`maxdrop.monitoring.drop_mask_render`). Training is untouched: the copy reads the
parameters but has its own buffers, counters and mode flags and no other callback's hooks, and every
random-number generator is restored afterwards (``docs/monitoring.md``, "drop-mask images").
"""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from maxdrop.models.slots import find_dropout_slots
from maxdrop.monitoring.drop_mask_render import compose_grid, drop_map, image_summary, input_map, labelled_png

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
        # (model input, display in [0, 1], labels or None), on the CPU
        self._images: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._last_step: int | None = None
        self._off_reason: str | None = None

    # ---------------------------------------------------------------- the K images

    def _pick(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=g)[: min(self.num_images, n)].sort().values

    def _choose_images(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor, Tensor | None]:
        """(model input float32 (K, 3, H, W), display float32 (K, 3, H, W) in [0, 1], labels (K,) or
        None) on the CPU."""
        dm = trainer.datamodule
        if dm is not None and callable(getattr(dm, "split", None)) and callable(getattr(dm, "transform_batch", None)):
            from maxdrop.data import RawBatch

            images, labels = dm.split("val")
            idx = self._pick(len(labels))
            raw, lab = images[idx], labels[idx]
            x, _ = dm.transform_batch(RawBatch(raw, lab, None))
            return x.float().cpu(), raw.float().div(255).cpu(), lab.cpu()
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
        pairs = all(isinstance(it, (tuple, list)) and len(it) > 1 for it in items)
        labels = torch.as_tensor([int(it[1]) for it in items]) if pairs else None
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return x, (x - lo) / (hi - lo).clamp_min(1e-12), labels  # display: min-max per image

    # ---------------------------------------------------------------- the forward

    @staticmethod
    def _record(
        backbone: nn.Module, x: Tensor, targets: Tensor | None = None
    ) -> tuple[dict[str, tuple[Tensor, Tensor, str]], dict[str, str]]:
        """Runs ``backbone`` (a private copy) on ``x`` (with ``targets`` when the backbone declares
        ``needs_targets``, as for ProbGuidedMaxout at the head); returns ``{slot: (input map, drop map, what a
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
                if targets is not None and getattr(backbone, "needs_targets", False):
                    backbone(x, targets.to(x.device))
                else:
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
                x, shown, labels = self._images
                twin = _private_copy(backbone)
                x = x.to(device, param.dtype if param is not None else None)
                maps, self.skipped = self._record(twin, x, labels)
                del twin
            except Exception as err:  # a picture must never end a training run
                return self._turn_off(f"{type(err).__name__}: {err}")
        for name, (m, d, cell) in maps.items():
            rgb = compose_grid(shown, m, d, self.cell)
            png, size = labelled_png(rgb, self.cell + 2)
            summary = image_summary(f"{TAG}/{name}", png, size, LEGEND.format(k=len(shown), cell=cell))
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
