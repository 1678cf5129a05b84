"""ProbGuidedMaxout trained in the head: through ClassificationModule, compiled, from YAML with `maxdrop fit`,
and on 2 DDP ranks. The DDP test runs ``python tests/training/test_prob_guided_maxout_training.py OUT_DIR``;
Lightning's launcher starts the second rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from maxdrop import ProbGuidedMaxout
from maxdrop.callbacks import SparsityMonitor, load_sparsity_summary
from maxdrop.cli import MaxdropCLI
from maxdrop.models import FastCNN
from maxdrop.module import ClassificationModule
from tests.helpers.data import tiny_run_config
from tests.helpers.models import BACKBONES
from tests.helpers.monitoring import images, make_trainer
from tests.helpers.references import prob_guided_maxout_reference


class HeadCounter(pl.Callback):
    """Counts, per training epoch, what the head layer should drop, from its own hook and the transcription."""

    def __init__(self) -> None:
        self.counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # epoch -> [dropped, seen]
        self.classifiers: list = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        def hook(layer: nn.Module, args: tuple) -> None:
            if not layer.training:
                return
            x, targets, classifier = args  # the backbone passes all three in training
            self.classifiers.append(classifier)
            with torch.no_grad():
                dropped = prob_guided_maxout_reference(x, classifier(x), targets)[0]
            c = self.counts[trainer.current_epoch]
            c[0] += int(dropped.sum())
            c[1] += x.numel()

        pl_module.backbone.head_slot.register_forward_pre_hook(hook)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_trains_it_in_the_head_through_the_module(tmp_path, name):
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone=partial(BACKBONES[name], slots={"head": ProbGuidedMaxout}), lr_scheduler=None
    )
    layer, fc = module.backbone.head_slot, module.backbone.fc
    counter, monitor = HeadCounter(), SparsityMonitor(histograms=False)
    trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.callbacks.append(counter)
    fc_before = fc.weight.detach().clone()
    trainer.fit(module, images(8, 0), images(4, 1))
    dropped, seen = counter.counts[0]
    assert seen == 2 * 4 * fc.in_features == int(layer.seen_total) == monitor.logged["maxdrop/head/seen"]
    assert dropped == int(layer.dropped_total) == monitor.logged["maxdrop/head/dropped"] > 0
    assert layer.scale.item() != 1.0 and not torch.equal(fc.weight, fc_before)  # both were trained
    # The layer scored with the backbone's own classifier (its parameters, FastCNN's logit scale included).
    assert all(c == module.backbone.classify for c in counter.classifiers) and len(counter.classifiers) == 2


@pytest.mark.slow
def test_compiled_backbone_computes_the_eager_gradients():
    backbone = partial(FastCNN, widths=(4, 8, 16), slots={"head": ProbGuidedMaxout})
    torch.manual_seed(0)
    eager = ClassificationModule(backbone=backbone)
    compiled = ClassificationModule(backbone=backbone, compile=True, compile_kwargs={"backend": "aot_eager"})
    compiled.load_state_dict(eager.state_dict())
    compiled._prepare_fast_paths()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    grads = []
    for m in (eager, compiled):
        loss = F.cross_entropy(m.train()(x, y), y)
        grads.append(torch.autograd.grad(loss, list(m.backbone.parameters())))
    assert int(compiled.backbone.head_slot.seen_total) == 8 * 16
    assert int(compiled.backbone.head_slot.dropped_total) == int(eager.backbone.head_slot.dropped_total)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_maxdrop_fit_from_yaml_counts_the_head_exactly(tmp_path, monkeypatch, tiny_tree):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    callbacks = [
        {"class_path": "maxdrop.callbacks.SparsityMonitor"},
        {"class_path": f"{__name__}.HeadCounter"},
    ]
    config = yaml.safe_load(
        tiny_run_config(
            str(tiny_tree),
            slots={"head": {"class_path": "maxdrop.ProbGuidedMaxout"}},
            lr_scheduler=None,
            trainer={"limit_train_batches": 3, "callbacks": callbacks},
        )
    )
    config["model"]["init_args"]["backbone"]["init_args"]["widths"] = [4, 8, 16]
    (tmp_path / "pgm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cli = MaxdropCLI(args=["fit", "--config", "pgm.yaml"])
    (counter,) = [c for c in cli.trainer.callbacks if isinstance(c, HeadCounter)]
    assert isinstance(cli.model.backbone.head_slot, ProbGuidedMaxout)
    records = load_sparsity_summary(tmp_path / "lightning_logs" / "version_0")["records"]
    head = {r["epoch"]: r for r in records if r["slot"] == "head"}
    assert sorted(head) == [0, 1]
    for epoch, rec in head.items():
        assert [rec["dropped"], rec["seen"]] == counter.counts[epoch], epoch
        assert rec["seen"] == 3 * 8 * 16
    assert sum(r["dropped"] for r in head.values()) > 0


def ddp_fit(out: Path) -> None:
    """Fits with ProbGuidedMaxout in the head on 2 gloo ranks (strategy="ddp": no unused parameters allowed);
    each rank saves its weights and writes its own independent counts and the monitor's figures."""
    pl.seed_everything(0, verbose=False)
    module = ClassificationModule(backbone=partial(FastCNN, widths=(4, 8, 16), slots={"head": ProbGuidedMaxout}))
    counter, monitor = HeadCounter(), SparsityMonitor(histograms=False, summary_file=None)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=1,
        logger=False,
        callbacks=[monitor, counter],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, images(24, 0), images(8, 1))
    rank = trainer.global_rank
    torch.save(module.backbone.state_dict(), out / f"rank{rank}.pt")
    same_fc = all(c == module.backbone.classify for c in counter.classifiers)
    record = {"counts": counter.counts[0], "logged": monitor.logged, "same_fc": same_fc}
    (out / f"rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_ddp_ranks_stay_in_sync_and_the_monitor_sums_their_counts(tmp_path):
    root = str(Path(__file__).resolve().parents[2])  # the script imports tests.helpers: the repository root
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": pythonpath}
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # fc and scale were trained by the gradients DDP averaged: the replicas stay equal.
    assert weights[0]["head_slot.scale"] != 1.0
    for key in ("head_slot.scale", "fc.weight", "stem.0.weight"):
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0)
    assert all(r["same_fc"] for r in ranks)
    dropped, seen = (sum(r["counts"][i] for r in ranks) for i in (0, 1))
    assert seen == 2 * 3 * 4 * 16
    assert ranks[0]["logged"]["maxdrop/head/seen"] == seen
    assert ranks[0]["logged"]["maxdrop/head/dropped"] == dropped > 0


if __name__ == "__main__":
    ddp_fit(Path(sys.argv[1]))
