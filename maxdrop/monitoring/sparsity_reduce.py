"""The cross-rank reduction of :class:`~maxdrop.callbacks.SparsityMonitor`: one block of per-slot
sums per rank, summed over the DDP ranks once per epoch (or per step window)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from maxdrop.monitoring.sparsity_counting import SlotSums

__all__ = ["COLUMNS", "local_scalars", "reduce_sums", "target_device"]

#: Columns of the per-slot scalar block that is all-reduced at the end of an epoch.
COLUMNS = ("dropped", "seen", "nz_in", "numel_in", "nz_out", "numel_out", "nonfinite")
DROPPED, SEEN, NZ_IN, NUMEL_IN, NZ_OUT, NUMEL_OUT, NONFINITE = range(len(COLUMNS))
_BIG = 2**62


def target_device(trainer: pl.Trainer) -> torch.device:
    """One process: finish on the CPU (float64 everywhere, e.g. MPS has none). DDP: the device the
    strategy's collectives run on."""
    return trainer.strategy.root_device if trainer.world_size > 1 else torch.device("cpu")


def local_scalars(sums: list[SlotSums | None], device: torch.device) -> Tensor:
    """float64 (S, len(COLUMNS)) of this rank, one row per slot (zeros for a slot that never ran)."""
    counts = torch.zeros(len(sums), 4, dtype=torch.int64, device=device)  # dropped, nz_in, nz_out, nonfinite
    host = torch.zeros(len(sums), 3, dtype=torch.float64)  # seen, numel_in, numel_out
    for i, acc in enumerate(sums):
        if acc is None:
            continue
        counts[i, 1:3] = acc.nonzero_totals(device)
        if acc.dropped is not None:
            counts[i, 0] = acc.dropped.to(device)
        if acc.nonfinite is not None:
            counts[i, 3] = acc.nonfinite.to(device)
        host[i] = torch.tensor([acc.seen, acc.numel_in, acc.numel_out], dtype=torch.float64)
    counts = counts.to(torch.float64)
    host = host.to(device)
    columns = [counts[:, 0], host[:, 0], counts[:, 1], host[:, 1], counts[:, 2], host[:, 2], counts[:, 3]]
    return torch.stack(columns, dim=1)


def reduce_sums(
    trainer: pl.Trainer, names: list[str], sums: list[SlotSums | None], per_channel: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Global sums: scalars float64 (S, len(COLUMNS)) on the CPU and, per slot with a channel count
    agreed by all ranks, float64 (3, C): nonzero in, nonzero out, sum |x| in, per channel.

    Every rank calls this at the same point with the same slots, so the collectives match.
    """
    device = target_device(trainer)
    distributed = trainer.world_size > 1
    scalars = local_scalars(sums, device)
    channels = [0] * len(names)
    if per_channel:
        local = [0 if a is None else a.channels for a in sums]  # 0: never ran, -1: C changed
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
        for acc, c in zip(sums, channels, strict=True):
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
    n = len(names) * len(COLUMNS)
    out_scalars = payload[:n].view(len(names), len(COLUMNS))
    per: dict[str, Tensor] = {}
    offset = n
    for name, c in zip(names, channels, strict=True):
        if c:
            per[name] = payload[offset : offset + 3 * c].view(3, c)
            offset += 3 * c
    return out_scalars, per


def reduce_window(trainer: pl.Trainer, window: Tensor) -> Tensor:
    """The step-window sums (S, len(COLUMNS)) of every rank, on the CPU."""
    if trainer.world_size > 1:
        window = trainer.strategy.reduce(window.clone(), reduce_op="sum")
    return window.cpu()
