"""SparsityMonitor under real DDP: Lightning's strategy="ddp" with 2 gloo processes on the CPU.

Run by the test as ``python tests/monitoring/test_sparsity_ddp.py OUT_DIR 2``; Lightning's DDP launcher
starts rank 1 by running the same command again. Each rank writes what it logged and its own
independent counts to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maxdrop.callbacks import SparsityMonitor, load_sparsity_summary
from tests.helpers.monitoring import CHANNELS, TinyBackbone, TinyModule, default_slots, read_events

EPOCHS, BATCHES, VAL_BATCHES, BATCH = 2, 3, 2, 8
# One worker for the module: its 2-process run (a module fixture) is then launched once, not once per worker.
pytestmark = pytest.mark.xdist_group("sparsity_ddp")
SLOTS = ("stage1", "stage2", "head", "aux")


class RankModule(TinyModule):
    """The tiny model with an extra slot ``aux`` that only rank 0 runs."""

    def __init__(self) -> None:
        super().__init__(TinyBackbone({**default_slots(), "aux": nn.Dropout(0.2)}))

    def setup(self, stage: str) -> None:
        self.backbone.skip_aux = self.trainer.global_rank == 1


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=BATCH)  # Lightning gives each rank its own shard


def run(out: Path, devices: int) -> None:
    """Fits on ``devices`` CPU processes and writes this rank's figures to ``out/rank<r>.json``."""
    pl.seed_everything(0, verbose=False)
    monitor = SparsityMonitor()
    module = RankModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=EPOCHS,
        limit_train_batches=BATCHES,
        limit_val_batches=VAL_BATCHES,
        logger=TensorBoardLogger(out, name="", version=0),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(module, data(64, 0), data(32, 1))
    counts = [[*k, dict(v)] for k, v in module.counts.items()]
    record = {"rank": trainer.global_rank, "logged": monitor.logged, "counts": counts}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def independent(ranks: list[dict], phase: str, epoch: int, slot: str, key: str) -> float:
    return sum(c[3].get(key, 0) for r in ranks for c in r["counts"] if c[:3] == [phase, epoch, slot])


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    root = str(Path(__file__).resolve().parents[2])  # the script imports tests.helpers: the repository root
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, __file__, str(out), "2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run(out, 1)
    return json.loads((out / "rank0.json").read_text())


@pytest.mark.slow
def test_every_rank_logs_the_same_tags_and_values(ddp_run):
    _, (r0, r1) = ddp_run
    assert r0["logged"] and set(r0["logged"]) == set(r1["logged"])
    assert r0["logged"] == r1["logged"]  # global figures, not each rank's own
    assert {k.split("/")[1] for k in r0["logged"]} == set(SLOTS)


@pytest.mark.slow
def test_seen_doubles_with_two_devices(ddp_run, one_device):
    _, (r0, _) = ddp_run
    for slot in ("stage1", "stage2", "head"):
        one = one_device["logged"][f"maxdrop/{slot}/seen"]
        assert one == BATCHES * BATCH * CHANNELS[slot] * (64 if slot != "head" else 1)
        assert r0["logged"][f"maxdrop/{slot}/seen"] == 2 * one
    # aux runs on rank 0 only: its global count is rank 0's alone.
    assert r0["logged"]["maxdrop/aux/seen"] == one_device["logged"]["maxdrop/aux/seen"]


@pytest.mark.slow
def test_global_figures_equal_independent_counts_summed_over_ranks(ddp_run):
    out, ranks = ddp_run
    summary = load_sparsity_summary(out / "version_0")
    assert summary["world_size"] == 2
    records = {(r["epoch"], r["slot"]): r for r in summary["records"]}
    assert set(records) == {(e, s) for e in range(EPOCHS) for s in SLOTS}
    for (epoch, slot), rec in records.items():
        dropped = independent(ranks, "train", epoch, slot, "dropped")
        seen = independent(ranks, "train", epoch, slot, "seen")
        assert rec["dropped"] == dropped > 0
        assert rec["seen"] == seen
        assert rec["dropped_fraction"] == pytest.approx(dropped / seen)  # global ratio, not a mean of ratios
        numel = independent(ranks, "train", epoch, slot, "numel")
        assert rec["train_zero_out"] == pytest.approx(independent(ranks, "train", epoch, slot, "zero_out") / numel)
        numel = independent(ranks, "val", epoch, slot, "numel")
        assert rec["val_zero_in"] == pytest.approx(independent(ranks, "val", epoch, slot, "zero_in") / numel)


@pytest.mark.slow
def test_rank_zero_writes_the_tensorboard_tags_and_histograms(ddp_run):
    out, (r0, _) = ddp_run
    acc = read_events(out / "version_0")
    assert {t for t in acc.Tags()["scalars"] if t.startswith("maxdrop")} == set(r0["logged"])
    for slot in SLOTS:
        h = acc.Histograms(f"maxdrop/{slot}/channel_drop_rate")
        assert len(h) == EPOCHS and h[-1].histogram_value.num == CHANNELS.get(slot, 6)
    assert len(list((out / "version_0").glob("events.out.tfevents.*"))) == 1  # rank 1 wrote no event file


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))
