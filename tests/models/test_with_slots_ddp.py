"""A WithSlots model under real DDP (2 gloo processes on the CPU): the monitor sums each slot over the ranks.

Run by the test as ``python tests/models/test_with_slots_ddp.py OUT_DIR 2``; Lightning's DDP launcher
starts rank 1 by running the same command again. Each rank writes what it logged and its own
independent count to ``OUT_DIR/rank<r>.json``.
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
from torch.utils.data import DataLoader, TensorDataset

from maxdrop import MaxDropout
from maxdrop.callbacks import SparsityMonitor
from maxdrop.models import ResNet18, WithSlots
from maxdrop.module import ClassificationModule

STAGES = [f"stages.{s}" for s in range(4)]


def run(out: Path, devices: int) -> None:
    pl.seed_everything(0, verbose=False)
    backbone = WithSlots(ResNet18(width=4), {"stages": {"after": STAGES, "layer": MaxDropout(0.3)}}, num_classes=10)
    module = ClassificationModule(backbone=backbone, num_classes=10, lr_scheduler=None)
    counts = dict.fromkeys(backbone.dropout_slots(), 0)
    for name, layer in backbone.dropout_slots().items():
        seen: dict = {}
        layer.register_forward_pre_hook(lambda m, a, seen=seen: seen.__setitem__("x", a[0].detach().clone()))

        def post(m, a, y, name=name, seen=seen):
            if m.training:
                counts[name] += int(((seen["x"] != 0) & (y == 0)).sum())

        layer.register_forward_hook(post)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g))
    monitor = SparsityMonitor(histograms=False, summary_file=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(module, DataLoader(ds, batch_size=8))
    logged = {k: v for k, v in monitor.logged.items() if k.endswith("/dropped")}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"logged": logged, "counts": counts}))


@pytest.mark.slow
def test_wrapped_model_under_ddp_sums_each_slot_over_the_ranks(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), *sys.path])}
    cmd = [sys.executable, str(Path(__file__).resolve()), str(tmp_path), "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["logged"] == ranks[1]["logged"]  # every rank logs the all-reduced figures
    for name in STAGES:
        both = ranks[0]["counts"][name] + ranks[1]["counts"][name]
        assert ranks[0]["logged"][f"maxdrop/{name}/dropped"] == both > ranks[0]["counts"][name] > 0


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]))
