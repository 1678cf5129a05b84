"""How many units each dropout slot shuts off, and how sparse its activations are.

:class:`SparsityMonitor` is a Lightning callback. It finds the backbone's dropout slots
(``backbone.dropout_slots() -> {name: layer}``), watches each slot's layer with forward hooks,
sums its figures on the device during the epoch (no host-device sync per layer per step), reduces
them across DDP ranks once at the end of the epoch, and writes them to every logger, to TensorBoard
histograms and to a JSON summary in the run folder. ``docs/monitoring.md`` lists every tag.

The parts live beside this file: :mod:`~maxdrop.monitoring.sparsity_counting` (the slots and the
sums the hooks keep), :mod:`~maxdrop.monitoring.sparsity_reduce` (the cross-rank reduction) and
:mod:`~maxdrop.monitoring.sparsity_writing` (loggers, histograms, the summary file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from maxdrop.models.slots import find_dropout_slots
from maxdrop.monitoring.sparsity_counting import (
    EXACT_COUNT,
    SlotSums,
    channel_stats,
    has_drop_counters,
    has_nonfinite,
)
from maxdrop.monitoring.sparsity_reduce import local_scalars, reduce_sums, reduce_window, target_device
from maxdrop.monitoring.sparsity_writing import (
    SUMMARY_FORMAT,
    SummaryFile,
    load_sparsity_summary,
    log_figures,
    slot_figures,
    slot_totals,
    write_histograms,
)
from maxdrop.utils.distributed import destroy_process_group_at_exit

__all__ = ["SUMMARY_FORMAT", "SparsityMonitor", "find_dropout_slots", "load_sparsity_summary"]

# Elements per channel and batch above which count_nonzero counts (see sparsity_counting.EXACT_COUNT);
# read from this module at each call, so that it can be lowered here to test that path.
_EXACT_COUNT = EXACT_COUNT
_EPOCH_KEYS = ("dropped", "seen", "dropped_fraction", "train_zero_in", "train_zero_out", "nonfinite")


class SparsityMonitor(pl.Callback):
    """Logs how many units each dropout slot shuts off and how sparse its activations are.

    For every slot of ``pl_module.backbone.dropout_slots()``, once per epoch, summed over all
    training steps of the epoch and over all DDP ranks (the sums stay on the device during the
    epoch; at its end one all-reduce carries them all, after a tiny one in which the ranks agree
    on each slot's channel count for the histograms):

    - ``maxdrop/<slot>/dropped``, ``maxdrop/<slot>/seen``: units the layer shut off / saw in training.
      maxdrop layers count these themselves; for other layers (``nn.Dropout``, ``DropBlock2d``, ...)
      ``dropped`` is the number of elements that entered nonzero and left zero, ``seen`` the elements
      that entered.
    - ``maxdrop/<slot>/dropped_fraction``: global ``dropped / seen``.
    - ``maxdrop/<slot>/train_zero_in``, ``train_zero_out``, ``val_zero_in``, ``val_zero_out``:
      fraction of exactly-zero elements entering / leaving the slot in training / validation.
    - histograms ``maxdrop/<slot>/channel_drop_rate`` (per channel: fraction of its elements that
      entered nonzero and left zero) and ``maxdrop/<slot>/channel_magnitude`` (per channel: mean
      ``|x|`` entering), written by rank 0 to TensorBoard.
    - ``maxdrop/<slot>/nonfinite``: training batches in which a NaN or an infinity entered the slot
      (counted, never raised on; the histograms skip such channels).
    - a slot that fills several positions (``block.0`` ... ``block.11`` of a WideResNet, ``stages.0``
      ... of a ``WithSlots`` slot) is reported per position and as a total, ``maxdrop/<slot>/...``,
      summed over its positions (the epoch figures; histograms and step values stay per position).
    - with ``log_every_n_batches=N``: ``maxdrop_step/<slot>/dropped_fraction``, ``zero_in`` and
      ``zero_out`` over the last N training batches of all ranks.

    The epoch figures also go to ``trainer.callback_metrics`` (so checkpoint and early-stopping
    callbacks can monitor them) and to a JSON summary in the run folder (see
    :func:`load_sparsity_summary` and ``docs/monitoring.md``).

    Args:
        histograms: write the per-channel TensorBoard histograms.
        log_every_n_batches: also log step-level values every this many training batches
            (one all-reduce and one host-device sync each time); 0 turns them off.
        validation: measure the zero fractions in validation too.
        summary_file: JSON summary path, relative to the run folder (``trainer.log_dir``) unless
            absolute; None writes none.
    """

    def __init__(
        self,
        histograms: bool = True,
        log_every_n_batches: int = 0,
        validation: bool = True,
        summary_file: str | None = "sparsity.json",
    ) -> None:
        super().__init__()
        if isinstance(log_every_n_batches, bool) or not isinstance(log_every_n_batches, int) or log_every_n_batches < 0:
            raise ValueError(
                f"log_every_n_batches must be an int >= 0 (0 = no step-level values), got {log_every_n_batches!r}"
            )
        if summary_file is not None and (not isinstance(summary_file, (str, os.PathLike)) or not str(summary_file)):
            raise ValueError(f"summary_file must be a non-empty path or None, got {summary_file!r}")
        self.histograms = bool(histograms)
        self.log_every_n_batches = log_every_n_batches
        self.validation = bool(validation)
        self.summary_file = None if summary_file is None else str(summary_file)
        #: Every tag this rank logged, with its latest value (the same on every rank).
        self.logged: dict[str, float] = {}
        self._slots: dict[str, nn.Module] = {}
        self._layer_counted: dict[str, bool] = {}
        self._handles: list[Any] = []
        self._attached = False
        self._warned = False
        self._phase: str | None = None
        self._acc: dict[str, dict[str, SlotSums]] = {"train": {}, "val": {}}
        self._pending: dict[str, tuple[int, int]] = {}
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._window: Tensor | None = None
        self._batches = 0
        self._summary = SummaryFile(None)

    # ---------------------------------------------------------------- slots and hooks

    @property
    def slots(self) -> dict[str, nn.Module]:
        """The monitored slots, ``{name: layer}`` (empty before ``setup`` or when there is none)."""
        return dict(self._slots)

    def _attach(self, pl_module: pl.LightningModule, final: bool) -> None:
        if self._attached:
            return
        slots = find_dropout_slots(pl_module)
        if slots is None:
            if final and not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"SparsityMonitor: {type(pl_module).__name__} has no backbone with a dropout_slots() method "
                    "(looked at .backbone and at every submodule), so no sparsity is logged. Give the backbone "
                    "a dropout_slots() -> dict[str, nn.Module] method, as the maxdrop.models backbones have."
                )
            return
        self._attached = True
        self._slots = slots
        if not slots:
            rank_zero_info("SparsityMonitor: the backbone has no filled dropout slot; nothing to log.")
        for name, layer in slots.items():
            self._layer_counted[name] = has_drop_counters(layer)
            # Under torch.compile the hooks run eagerly, outside the graphs (a graph break at each
            # slot): their Python-side sums would otherwise be guarded on and recompile every step.
            pre, post = (
                torch.compiler.disable(self._make_pre_hook(name)),
                torch.compiler.disable(self._make_post_hook(name)),
            )
            self._handles.append(layer.register_forward_pre_hook(pre))
            self._handles.append(layer.register_forward_hook(post))

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._slots, self._layer_counted, self._attached = {}, {}, False

    def _buffer(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """A reusable scratch tensor of ``x``'s shape: fresh large CPU allocations cost page faults."""
        key = (x.device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < x.numel():
            buf = self._buffers[key] = torch.empty(x.numel(), dtype=dtype, device=x.device)
        return buf[: x.numel()].view(x.shape)

    def _channel_stats(self, x: Tensor, magnitude: bool) -> tuple[Tensor, Tensor | None]:
        """Per-channel nonzero count, int64 (C,), and sum of |x|, float32 (C,) or None
        (:func:`~maxdrop.monitoring.sparsity_counting.channel_stats`)."""
        return channel_stats(x, magnitude, self._buffer, _EXACT_COUNT)

    def _make_pre_hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            phase = self._phase
            x = args[0] if args else None
            if phase is None or not isinstance(x, Tensor):
                return
            acc = self._acc[phase].get(name)
            if acc is None:
                acc = self._acc[phase][name] = SlotSums()
            acc.numel_in += x.numel()
            if x.numel():
                with torch.no_grad():
                    nz, mag = self._channel_stats(x, phase == "train" and self.histograms)
                    acc.add(0, nz, mag)
                    if phase == "train" and x.is_floating_point():
                        acc.add_nonfinite(has_nonfinite(x, mag))
            if phase == "train" and self._layer_counted[name]:
                self._pending[name] = (module.last_dropped, x.numel())

        return pre_hook

    def _make_post_hook(self, name: str):
        def post_hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            phase = self._phase
            acc = None if phase is None else self._acc[phase].get(name)
            y = out[0] if isinstance(out, (tuple, list)) and out else out
            if acc is None or not isinstance(y, Tensor):
                return
            acc.numel_out += y.numel()
            if y.numel():
                with torch.no_grad():
                    acc.add(1, self._channel_stats(y, False)[0], None)
            if phase == "train" and name in self._pending:
                before, numel = self._pending.pop(name)
                if module.last_dropped is not before:  # the layer recorded this forward (a new count tensor)
                    d = module.last_dropped
                    acc.dropped = d if acc.dropped is None else acc.dropped + d
                    acc.seen += int(module.last_seen)
                else:  # a maxdrop layer that did not record (p=0) passed its input through
                    acc.seen += numel

        return post_hook

    # ---------------------------------------------------------------- reduction and writing

    def _sums(self, phase: str) -> list[SlotSums | None]:
        return [self._acc[phase].get(n) for n in self._slots]

    @staticmethod
    def _step(trainer: pl.Trainer, train_epoch_end: bool = False) -> int:
        # The step Lightning's own metrics use, so that curves line up (train epoch-end metrics
        # are logged at the last batch's step).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        return max(step - 1, 0) if train_epoch_end else step

    def _figures(self, names: list[str], scalars: Tensor) -> dict[str, dict[str, Any]]:
        """Each slot's figures from the reduced rows, then each multi-position slot's total."""
        figures = {name: slot_figures(scalars[i], self._layer_counted[name]) for i, name in enumerate(names)}
        for total, rows in slot_totals(names, self._layer_counted).items():
            figures[total] = slot_figures(scalars[rows].sum(0), self._layer_counted[names[rows[0]]])
        return figures

    def _write_epoch(self, trainer: pl.Trainer, step: int, fields: dict[str, dict[str, Any]]) -> None:
        metrics = {
            f"maxdrop/{name}/{key}": float(value)
            for name, values in fields.items()
            for key, value in values.items()
            if value is not None
        }
        log_figures(trainer, self.logged, metrics, step=step, epoch=trainer.current_epoch)
        self._summary.update(trainer.current_epoch, step, fields)
        if trainer.is_global_zero:
            self._summary.write(trainer.world_size, self._slots, self._layer_counted)

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()
        self._batches = 0
        path = None
        if self.summary_file is not None:
            run_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
            path = Path(self.summary_file)
            path = path if path.is_absolute() else Path(run_dir) / path
        self._summary = SummaryFile(path)
        # Hooks before the first forward, so that a torch.compile'd backbone traces them in.
        self._attach(pl_module, final=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach()
        self._buffers.clear()
        self._phase = None
        self._acc = {"train": {}, "val": {}}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module, final=True)  # slots may come from configure_model

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(pl_module, final=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._summary.keep_earlier_epochs(trainer.current_epoch)  # resuming into the same run folder

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._acc["train"] = {}
        self._window = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase = "train" if self._slots else None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._phase = None
        self._pending.clear()
        if not self._slots or not self.log_every_n_batches:
            return
        self._batches += 1
        if self._batches % self.log_every_n_batches:
            return
        # Step-level values over the last N batches: the change of the epoch's sums since last time.
        now = local_scalars(self._sums("train"), target_device(trainer))
        window = reduce_window(trainer, now if self._window is None else now - self._window)
        self._window = now
        metrics: dict[str, float] = {}
        for i, name in enumerate(self._slots):
            fig = slot_figures(window[i], self._layer_counted[name])
            for key in ("dropped_fraction", "zero_in", "zero_out"):
                if fig[key] is not None:
                    metrics[f"maxdrop_step/{name}/{key}"] = fig[key]
        log_figures(trainer, self.logged, metrics, step=self._step(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._slots:
            return
        names = list(self._slots)
        scalars, per = reduce_sums(trainer, names, self._sums("train"), per_channel=self.histograms)
        step = self._step(trainer, train_epoch_end=True)
        fields: dict[str, dict[str, Any]] = {}
        for name, fig in self._figures(names, scalars).items():
            fig["train_zero_in"], fig["train_zero_out"] = fig.pop("zero_in"), fig.pop("zero_out")
            fields[name] = {key: fig[key] for key in _EPOCH_KEYS}
        self._write_epoch(trainer, step, fields)
        write_histograms(trainer, names, per, scalars, step)
        self._acc["train"] = {}

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._acc["val"] = {}

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        active = self._slots and self.validation and not trainer.sanity_checking
        self._phase = "val" if active else None

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._phase = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._slots or not self.validation or trainer.sanity_checking:
            return
        names = list(self._slots)
        scalars, _ = reduce_sums(trainer, names, self._sums("val"), per_channel=False)
        fields = {
            name: {"val_zero_in": fig["zero_in"], "val_zero_out": fig["zero_out"]}
            for name, fig in self._figures(names, scalars).items()
        }
        self._write_epoch(trainer, self._step(trainer), fields)
        self._acc["val"] = {}
