"""How many units each dropout slot shuts off, and how sparse its activations are.

:class:`SparsityMonitor` is a Lightning callback. It finds the backbone's dropout slots
(``backbone.dropout_slots() -> {name: layer}``), watches each slot's layer with forward hooks,
sums its figures on the device during the epoch (no host-device sync per layer per step), reduces
them across DDP ranks once at the end of the epoch, and writes them to every logger, to TensorBoard
histograms and to a JSON summary in the run folder. ``docs/monitoring.md`` lists every tag.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from maxdrop.distributed import destroy_process_group_at_exit

__all__ = ["SUMMARY_FORMAT", "SparsityMonitor", "find_dropout_slots", "load_sparsity_summary"]

#: ``format`` field of the summary file; bumped when its layout changes.
SUMMARY_FORMAT = "maxdrop-sparsity/1"
#: Fields of one summary record besides ``epoch``, ``step`` and ``slot``; None where undefined.
RECORD_FIELDS = (
    "dropped",
    "seen",
    "dropped_fraction",
    "train_zero_in",
    "train_zero_out",
    "val_zero_in",
    "val_zero_out",
)
# A float32 sum of 0/1 values is exact while the count stays below 2**24: channels with up to this
# many elements per batch are counted through a float buffer (vectorized), larger ones with
# count_nonzero (exact, slower).
_EXACT_COUNT = 2**24
# Elements per block of rows counted at a time on the CPU (512 KiB of float32: fits an L2 cache).
_CPU_BLOCK = 2**17
# Columns of the per-slot scalar block that is all-reduced at the end of an epoch.
_DROPPED, _SEEN, _NZ_IN, _NUMEL_IN, _NZ_OUT, _NUMEL_OUT = range(6)
_BIG = 2**62


def find_dropout_slots(module: nn.Module) -> dict[str, nn.Module] | None:
    """The dropout slots of a LightningModule's backbone.

    Looks for ``module.backbone.dropout_slots()`` first, then for a ``dropout_slots`` method on any
    submodule (the outermost ones; slot names get the submodule's path as a prefix when there are
    several).

    Args:
        module: usually the LightningModule.

    Returns:
        ``{slot name: layer}`` (empty when the backbone has no filled slot), or None when no module
        has a ``dropout_slots`` method.

    Raises:
        TypeError: ``dropout_slots()`` returned something other than a ``{str: nn.Module}`` mapping.
        ValueError: one layer instance fills two slots (its counts would be taken twice).
    """
    backbone = getattr(module, "backbone", None)
    if isinstance(backbone, nn.Module) and callable(getattr(backbone, "dropout_slots", None)):
        owners = [("", backbone)]
    else:
        owners = []
        for path, sub in module.named_modules():
            if callable(getattr(sub, "dropout_slots", None)) and not any(
                path.startswith(p + ".") or p == "" for p, _ in owners
            ):
                owners.append((path, sub))
        if not owners:
            return None
    slots: dict[str, nn.Module] = {}
    for path, owner in owners:
        found = owner.dropout_slots()
        if not isinstance(found, Mapping):
            raise TypeError(
                f"{type(owner).__name__}.dropout_slots() must return a dict {{slot name: nn.Module}}, "
                f"got {type(found).__name__}"
            )
        for name, layer in found.items():
            if not isinstance(name, str) or not isinstance(layer, nn.Module):
                raise TypeError(
                    f"{type(owner).__name__}.dropout_slots() must map str to nn.Module, "
                    f"got {name!r}: {type(layer).__name__}"
                )
            slots[f"{path}.{name}" if len(owners) > 1 else name] = layer
    by_id: dict[int, str] = {}
    for name, layer in slots.items():
        if id(layer) in by_id:
            raise ValueError(
                f"slots {by_id[id(layer)]!r} and {name!r} hold the same {type(layer).__name__} instance; "
                "every slot needs its own layer instance"
            )
        by_id[id(layer)] = name
    return slots


def _has_drop_counters(layer: nn.Module) -> bool:
    """Whether ``layer`` counts its own drops (the maxdrop layers' ``_DropStats`` protocol)."""
    return all(hasattr(layer, a) for a in ("last_dropped", "last_seen", "seen_total")) and bool(
        getattr(layer, "track_stats", True)
    )


def _ncl(x: Tensor) -> tuple[int, int, int]:
    """(N, C, L): batch, channels (dim 1; 1 for a 0/1-dim input) and elements per (sample, channel)."""
    if x.ndim <= 1:
        return (x.shape[0] if x.ndim else 1), 1, 1
    n, c = x.shape[0], x.shape[1]
    return n, c, x.numel() // (n * c)


class _Acc:
    """Running sums of one slot in one phase, on the activations' device.

    Attributes:
        cnt: int64 (2, C): nonzero elements entering (row 0) and leaving (row 1), per channel.
        mag: float32 (C,): sum of |x| entering, per channel (train with histograms only).
        folded: int64 (2,): totals moved out of ``cnt`` when the channel count changed mid-epoch.
        channels: C of ``cnt``; -1 once it changed (no per-channel figures this epoch).
        numel_in, numel_out: elements entering / leaving (Python ints, known from the shapes).
        dropped: int64 0-dim: the layer's own drop count (slots whose layer counts drops).
        seen: elements the layer counted as seen (slots whose layer counts drops).
    """

    def __init__(self) -> None:
        self.cnt: Tensor | None = None
        self.mag: Tensor | None = None
        self.folded: Tensor | None = None
        self.channels = 0
        self.numel_in = 0
        self.numel_out = 0
        self.dropped: Tensor | None = None
        self.seen = 0

    def add(self, row: int, nz: Tensor, mag: Tensor | None) -> None:
        """Adds per-channel nonzero counts ``nz`` (C,) (and ``mag`` (C,)) to row 0 (in) or 1 (out)."""
        c = nz.shape[0]
        if self.channels == 0:
            self.channels = c
            self.cnt = torch.zeros(2, c, dtype=torch.int64, device=nz.device)
            self.mag = None if mag is None else torch.zeros(c, dtype=torch.float32, device=nz.device)
        if self.channels == c:
            self.cnt[row] += nz
            if mag is not None and self.mag is not None:
                self.mag += mag
            return
        if self.channels > 0:  # a new channel count: keep the totals, give up the per-channel figures
            self.folded = self.cnt.sum(1)
            self.cnt = self.mag = None
            self.channels = -1
        self.folded[row] += nz.sum()

    def nonzero_totals(self, device: torch.device) -> Tensor:
        """int64 (2,): nonzero elements entering and leaving, summed over channels."""
        total = torch.zeros(2, dtype=torch.int64, device=device)
        if self.cnt is not None:
            total += self.cnt.sum(1).to(device)
        if self.folded is not None:
            total += self.folded.to(device)
        return total


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
        self._acc: dict[str, dict[str, _Acc]] = {"train": {}, "val": {}}
        self._pending: dict[str, tuple[int, int]] = {}
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._window: Tensor | None = None
        self._batches = 0
        self._summary_path: Path | None = None
        self._records: dict[tuple[int, str], dict[str, Any]] = {}

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
            self._layer_counted[name] = _has_drop_counters(layer)
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
        """Per-channel nonzero count, int64 (C,), and sum of |x|, float32 (C,) or None.

        Args:
            x: a slot's input or output, (N, C, ...), (N, F), (N,) or 0-dim.
            magnitude: also return the per-channel sum of |x|.
        """
        n, c, length = _ncl(x)
        if n * length > _EXACT_COUNT:
            v = x.reshape(n, c, length)
            mag = v.abs().sum((0, 2), dtype=torch.float32) if magnitude else None
            return torch.count_nonzero(v, dim=(0, 2)), mag
        x = x.reshape(1) if x.ndim == 0 else x
        m = c * length
        # On the CPU a block of rows at a time, so that the scratch buffer stays in the L2 cache.
        rows = n if x.device.type != "cpu" else max(1, min(n, _CPU_BLOCK // m))
        cnt = mag = None
        for i in range(0, n, rows):
            block = x[i : i + rows]
            k = block.shape[0]
            # out= into a reused buffer, then float sums over the batch (contiguous, vectorized):
            # sums of 0/1 stay exact while below 2**24.
            if magnitude:
                a = torch.abs(block, out=self._buffer(block, x.dtype)).view(k, m).sum(0, dtype=torch.float32)
                mag = a if mag is None else mag.add_(a)
            ones = torch.ne(block, 0, out=self._buffer(block, torch.float32)).view(k, m).sum(0)
            cnt = ones if cnt is None else cnt.add_(ones)
        return cnt.view(c, length).sum(1).long(), None if mag is None else mag.view(c, length).sum(1)

    def _make_pre_hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            phase = self._phase
            x = args[0] if args else None
            if phase is None or not isinstance(x, Tensor):
                return
            acc = self._acc[phase].get(name)
            if acc is None:
                acc = self._acc[phase][name] = _Acc()
            acc.numel_in += x.numel()
            if x.numel():
                with torch.no_grad():
                    acc.add(0, *self._channel_stats(x, phase == "train" and self.histograms))
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

    # ---------------------------------------------------------------- reduction

    def _local_scalars(self, phase: str, device: torch.device) -> Tensor:
        """float64 (S, 6) of this rank: dropped, seen, nz_in, numel_in, nz_out, numel_out per slot."""
        names = list(self._slots)
        accs = [self._acc[phase].get(n) for n in names]
        counts = torch.zeros(len(names), 3, dtype=torch.int64, device=device)  # dropped, nz_in, nz_out
        host = torch.zeros(len(names), 3, dtype=torch.float64)  # seen, numel_in, numel_out
        for i, acc in enumerate(accs):
            if acc is None:
                continue
            counts[i, 1:] = acc.nonzero_totals(device)
            if acc.dropped is not None:
                counts[i, 0] = acc.dropped.to(device)
            host[i] = torch.tensor([acc.seen, acc.numel_in, acc.numel_out], dtype=torch.float64)
        counts = counts.to(torch.float64)
        host = host.to(device)
        return torch.stack([counts[:, 0], host[:, 0], counts[:, 1], host[:, 1], counts[:, 2], host[:, 2]], dim=1)

    def _target_device(self, trainer: pl.Trainer) -> torch.device:
        # One process: finish on the CPU (float64 everywhere, e.g. MPS has none). DDP: the device
        # the strategy's collectives run on.
        return trainer.strategy.root_device if trainer.world_size > 1 else torch.device("cpu")

    def _reduce(self, trainer: pl.Trainer, phase: str, per_channel: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Global sums: scalars float64 (S, 6) on the CPU and, per slot with a channel count agreed
        by all ranks, float64 (3, C): nonzero in, nonzero out, sum |x| in, per channel.

        Every rank calls this at the same point with the same slots, so the collectives match.
        """
        device = self._target_device(trainer)
        distributed = trainer.world_size > 1
        names = list(self._slots)
        scalars = self._local_scalars(phase, device)
        channels = [0] * len(names)
        if per_channel:
            accs = [self._acc[phase].get(n) for n in names]
            local = [0 if a is None else a.channels for a in accs]  # 0: never ran, -1: C changed
            if distributed:
                # Agree on each slot's channel count first: (max C, max -C) over the ranks that saw it.
                header = torch.tensor(
                    [[c, -c] if c > 0 else ([_BIG, 0] if c < 0 else [0, -_BIG]) for c in local],
                    dtype=torch.int64,
                    device=device,
                )
                header = trainer.strategy.reduce(header, reduce_op="max")
                channels = [int(hi) if hi == -lo and 0 < hi < _BIG else 0 for hi, lo in header.tolist()]
            else:
                channels = [max(c, 0) for c in local]
            parts = [scalars.flatten()]
            for acc, c in zip(accs, channels, strict=True):
                if c == 0:
                    continue
                if acc is None or acc.channels != c:
                    parts.append(torch.zeros(3 * c, dtype=torch.float64, device=device))
                else:
                    parts.append(
                        torch.cat([acc.cnt.to(device, torch.float64).flatten(), acc.mag.to(device, torch.float64)])
                    )
            payload = torch.cat(parts)
        else:
            payload = scalars.flatten()
        if distributed:
            payload = trainer.strategy.reduce(payload, reduce_op="sum")
        payload = payload.cpu()
        n = len(names) * 6
        out_scalars = payload[:n].view(len(names), 6)
        per: dict[str, Tensor] = {}
        offset = n
        for name, c in zip(names, channels, strict=True):
            if c:
                per[name] = payload[offset : offset + 3 * c].view(3, c)
                offset += 3 * c
        return out_scalars, per

    # ---------------------------------------------------------------- figures and logging

    @staticmethod
    def _fraction(num: float, den: float) -> float | None:
        return num / den if den > 0 else None

    def _figures(self, row: Tensor, layer_counted: bool) -> dict[str, Any]:
        """Counts and fractions of one slot from a global (6,) row."""
        nz_in, numel_in, nz_out, numel_out = (int(v) for v in row[[_NZ_IN, _NUMEL_IN, _NZ_OUT, _NUMEL_OUT]])
        if layer_counted:
            dropped, seen = int(row[_DROPPED]), int(row[_SEEN])
        else:  # net shut-off: elements that entered nonzero and left zero
            dropped, seen = nz_in - nz_out, numel_in
        return {
            "dropped": dropped,
            "seen": seen,
            "dropped_fraction": self._fraction(dropped, seen),
            "zero_in": self._fraction(numel_in - nz_in, numel_in),
            "zero_out": self._fraction(numel_out - nz_out, numel_out),
        }

    @staticmethod
    def _step(trainer: pl.Trainer, train_epoch_end: bool = False) -> int:
        # The step Lightning's own metrics use, so that curves line up (train epoch-end metrics
        # are logged at the last batch's step).
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        return max(step - 1, 0) if train_epoch_end else step

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        if not metrics:
            return
        self.logged.update(metrics)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        to_log = dict(metrics) if epoch is None else {**metrics, "epoch": epoch}
        for logger in trainer.loggers:  # loggers write on global rank 0 only
            logger.log_metrics(to_log, step=step)

    def _write_histograms(self, trainer: pl.Trainer, per: dict[str, Tensor], scalars: Tensor, step: int) -> None:
        if not trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        names = list(self._slots)
        for name, stats in per.items():
            per_channel_numel = scalars[names.index(name), _NUMEL_IN] / stats.shape[1]
            if per_channel_numel <= 0:
                continue
            drop_rate = (stats[0] - stats[1]) / per_channel_numel
            magnitude = stats[2] / per_channel_numel
            for w in writers:
                w.add_histogram(f"maxdrop/{name}/channel_drop_rate", drop_rate, global_step=step)
                w.add_histogram(f"maxdrop/{name}/channel_magnitude", magnitude, global_step=step)

    # ---------------------------------------------------------------- summary file

    def _update_records(self, trainer: pl.Trainer, step: int, fields: dict[str, dict[str, Any]]) -> None:
        epoch = trainer.current_epoch
        for name, values in fields.items():
            rec = self._records.setdefault(
                (epoch, name), {"epoch": epoch, "step": step, "slot": name, **dict.fromkeys(RECORD_FIELDS)}
            )
            rec["step"] = max(rec["step"], step)
            rec.update(values)
        self._write_summary(trainer)

    def _record_order(self, key: tuple[int, str]) -> tuple[int, int, str]:
        # By epoch, then in the backbone's slot order (slots only in an older file come last).
        order = list(self._slots)
        return key[0], order.index(key[1]) if key[1] in order else len(order), key[1]

    def _write_summary(self, trainer: pl.Trainer) -> None:
        if self._summary_path is None or not trainer.is_global_zero:
            return
        summary = {
            "format": SUMMARY_FORMAT,
            "world_size": trainer.world_size,
            "slots": {
                name: {
                    "class": f"{type(layer).__module__}.{type(layer).__qualname__}",
                    "repr": repr(layer),
                    "dropped_counted_by": "layer" if self._layer_counted[name] else "hooks",
                }
                for name, layer in self._slots.items()
            },
            "records": [self._records[k] for k in sorted(self._records, key=self._record_order)],
        }
        path = self._summary_path
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic: readers see the old file or the new one, never a half-written one.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(summary, f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ---------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()
        self._records = {}
        self._batches = 0
        self._summary_path = None
        if self.summary_file is not None:
            run_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
            path = Path(self.summary_file)
            self._summary_path = path if path.is_absolute() else Path(run_dir) / path
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
        # Resuming into the same run folder: keep the records of the epochs already done.
        path = self._summary_path
        if path is not None and trainer.current_epoch > 0 and path.is_file():
            try:
                old = load_sparsity_summary(path)
            except ValueError as err:
                rank_zero_warn(f"SparsityMonitor: not keeping the old records of {path}: {err}")
            else:
                for rec in old["records"]:
                    if rec["epoch"] < trainer.current_epoch:
                        self._records[(rec["epoch"], rec["slot"])] = rec

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
        device = self._target_device(trainer)
        now = self._local_scalars("train", device)
        window = now if self._window is None else now - self._window
        self._window = now
        if trainer.world_size > 1:
            window = trainer.strategy.reduce(window.clone(), reduce_op="sum")
        window = window.cpu()
        metrics: dict[str, float] = {}
        for i, name in enumerate(self._slots):
            fig = self._figures(window[i], self._layer_counted[name])
            for key in ("dropped_fraction", "zero_in", "zero_out"):
                if fig[key] is not None:
                    metrics[f"maxdrop_step/{name}/{key}"] = fig[key]
        self._log(trainer, metrics, step=self._step(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._slots:
            return
        scalars, per = self._reduce(trainer, "train", per_channel=self.histograms)
        step = self._step(trainer, train_epoch_end=True)
        metrics: dict[str, float] = {}
        fields: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self._slots):
            fig = self._figures(scalars[i], self._layer_counted[name])
            fields[name] = {
                "dropped": fig["dropped"],
                "seen": fig["seen"],
                "dropped_fraction": fig["dropped_fraction"],
                "train_zero_in": fig["zero_in"],
                "train_zero_out": fig["zero_out"],
            }
            for key, value in fields[name].items():
                if value is not None:
                    metrics[f"maxdrop/{name}/{key}"] = float(value)
        self._log(trainer, metrics, step=step, epoch=trainer.current_epoch)
        self._write_histograms(trainer, per, scalars, step)
        self._update_records(trainer, step, fields)
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
        scalars, _ = self._reduce(trainer, "val", per_channel=False)
        step = self._step(trainer)
        metrics: dict[str, float] = {}
        fields: dict[str, dict[str, Any]] = {}
        for i, name in enumerate(self._slots):
            fig = self._figures(scalars[i], self._layer_counted[name])
            fields[name] = {"val_zero_in": fig["zero_in"], "val_zero_out": fig["zero_out"]}
            for key, value in fields[name].items():
                if value is not None:
                    metrics[f"maxdrop/{name}/{key}"] = value
        self._log(trainer, metrics, step=step, epoch=trainer.current_epoch)
        self._update_records(trainer, step, fields)
        self._acc["val"] = {}


def load_sparsity_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the summary a :class:`SparsityMonitor` wrote.

    Args:
        path: the JSON file, or the run folder that holds ``sparsity.json``.

    Returns:
        ``{"format", "world_size", "slots": {slot: {"class", "repr", "dropped_counted_by"}},
        "records": [{"epoch", "step", "slot", "dropped", "seen", "dropped_fraction", "train_zero_in",
        "train_zero_out", "val_zero_in", "val_zero_out"}, ...]}``, one record per epoch and slot.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a sparsity summary of a format this version reads.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "sparsity.json"
    if not path.is_file():
        raise FileNotFoundError(f"no sparsity summary at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != SUMMARY_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not a sparsity summary of format {SUMMARY_FORMAT!r} (found {found!r})")
    return data
