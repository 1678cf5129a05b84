"""ProbGuidedMaxout: its mask and output equal a literal transcription of the rule; gradients, eval,
counters, bad input; the `head` slot of every backbone trains it through ClassificationModule; a
`maxdrop fit` from YAML, with SparsityMonitor's count equal to an independent one; real DDP (2 gloo ranks).

The DDP test runs ``python tests/layers/test_prob_guided_maxout.py OUT_DIR``; Lightning's launcher starts
rank 1 by running the same command again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from maxdrop import MaxDropout, ProbGuidedMaxout
from maxdrop.callbacks import SparsityMonitor, load_sparsity_summary
from maxdrop.cli import MaxdropCLI
from maxdrop.layers import prob_guided_keep_fraction, prob_guided_maxout, prob_guided_maxout_mask
from maxdrop.models import FastCNN, ResNet18, WideResNet
from maxdrop.module import ClassificationModule
from tests.helpers.data import tiny_run_config
from tests.monitoring.test_sparsity import images, make_trainer


def transcription(x: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0):
    """The rule, one unit at a time: (dropped (N, D) bool, output (N, D) float64).

    q = softmax(logits)[target] (non-finite -> 0), keep = 1 - q/2 and D * keep in float32, kept units
    = the round(D * keep) smallest (Python's round; ties ranked by index), kept * scale / keep.
    """
    n, d = x.shape
    xs, ls = x.double().tolist(), logits.double().tolist()
    dropped, out = [], []
    for i in range(n):
        top = max(ls[i])
        exps = [math.exp(v - top) for v in ls[i]]
        q = np.float32(exps[int(targets[i])] / sum(exps))
        if not np.isfinite(q):
            q = np.float32(0.0)
        keep = np.float32(1.0) - q * np.float32(0.5)
        n_keep = round(float(np.float32(d) * keep))
        row = xs[i]
        drop = []
        for j in range(d):
            rank = sum(1 for k in range(d) if row[k] < row[j] or (row[k] == row[j] and k < j))
            drop.append(rank >= n_keep)
        dropped.append(drop)
        out.append([0.0 if drop[j] else row[j] * scale / float(keep) for j in range(d)])
    return torch.tensor(dropped, dtype=torch.bool).view(n, d), torch.tensor(out, dtype=torch.float64).view(n, d)


def varied_logits(n: int, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets whose true-class probability runs from near 1 down to near 0 over the batch."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g)
    targets = torch.randint(0, classes, (n,), generator=g)
    logits[torch.arange(n), targets] += torch.linspace(9, -6, n)
    return logits, targets


INPUTS = {
    "distinct": lambda g: torch.randn(9, 37, generator=g),
    "ties": lambda g: torch.randint(0, 4, (9, 20), generator=g).float(),
    "negative": lambda g: -torch.rand(6, 16, generator=g) - 1,
    "post-ReLU, most zero": lambda g: (torch.randn(9, 64, generator=g) - 1).relu(),
    "one sample": lambda g: torch.randn(1, 10, generator=g),
    "one unit": lambda g: torch.randn(9, 1, generator=g),
    "non-contiguous": lambda g: torch.randn(24, 9, generator=g).t(),
}
TOLERANCE = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("name", list(INPUTS))
def test_mask_and_output_equal_the_transcription(name, dtype):
    x = INPUTS[name](torch.Generator().manual_seed(1)).to(dtype)
    logits, targets = varied_logits(x.shape[0])
    logits = logits.to(dtype)
    dropped, expected = transcription(x, logits, targets, scale=1.25)
    assert torch.equal(prob_guided_maxout_mask(x, logits, targets), dropped)
    out = prob_guided_maxout(x, logits, targets, scale=1.25)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=TOLERANCE[dtype], atol=0)
    if x.shape[1] > 4:  # the cases cover nearly half of the units dropped (confident) and none (unsure)
        per_sample = dropped.sum(1)
        assert per_sample.max() >= x.shape[1] // 2 - 1 and (x.shape[0] == 1 or per_sample.min() == 0)


def test_the_layer_scores_with_the_classifier_it_is_given():
    g = torch.Generator().manual_seed(2)
    x, fc = torch.randn(12, 30, generator=g), nn.Linear(30, 5)
    _, targets = varied_logits(12, 5)
    layer = ProbGuidedMaxout()
    layer.scale.data.fill_(0.8)
    dropped, expected = transcription(x, fc(x), targets, scale=0.8)
    out = layer(x, targets, fc)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(out == 0, dropped | (x == 0))


def test_ties_are_ranked_by_index_and_half_counts_round_to_even():
    # Two equal logits: q = 0.5 exactly, keep = 0.75.
    logits, targets = torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64)
    for d, n_kept in [(2, 2), (6, 4), (10, 8)]:  # 1.5 -> 2, 4.5 -> 4, 7.5 -> 8
        x = torch.arange(d, dtype=torch.float32)[None]
        assert prob_guided_maxout_mask(x, logits, targets).sum() == d - n_kept
    x = torch.tensor([[3.0, 1.0, 3.0, 3.0, 0.0, 3.0]])  # keep 4 of 6: 0, 1 and the first two 3s
    mask = prob_guided_maxout_mask(x, logits, targets)
    assert mask.tolist() == [[False, False, False, True, False, True]]
    # One unit, a certain prediction: keep = 0.5, round(0.5) = 0, the unit is dropped.
    certain = torch.tensor([[0.0, 100.0]])
    assert prob_guided_maxout_mask(torch.ones(1, 1), certain, torch.tensor([1])).item()


def test_non_finite_scores_drop_nothing():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    logits = nn.Linear(8, 4)(x)  # row 1 is NaN
    mask = prob_guided_maxout_mask(x, logits, torch.tensor([0, 1, 2]))
    assert not mask[1].any()
    assert prob_guided_keep_fraction(logits, torch.tensor([0, 1, 2]))[1] == 1.0


def test_gradients_pass_kept_units_and_scale_and_never_reach_the_classifier():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, 24, generator=g).requires_grad_()
    fc = nn.Linear(24, 6)
    _, targets = varied_logits(10, 6)
    layer = ProbGuidedMaxout()
    layer.scale.data.fill_(1.5)
    out = layer(x, targets, fc)
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    assert fc.weight.grad is None and fc.bias.grad is None  # q came from a detached copy
    with torch.no_grad():
        logits = fc(x)
        dropped = prob_guided_maxout_mask(x, logits, targets)
        keep = prob_guided_keep_fraction(logits, targets)[:, None]
    assert dropped.any() and (~dropped).any()
    assert torch.all(x.grad[dropped] == 0)
    torch.testing.assert_close(x.grad, torch.where(dropped, 0.0, upstream * 1.5 / keep))
    torch.testing.assert_close(layer.scale.grad, (upstream * x.detach() * ~dropped / keep).sum())


def test_functional_scale_tensor_gets_its_gradient_and_bf16_passes_gradients():
    x = torch.randn(5, 12, dtype=torch.bfloat16, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)
    logits, targets = varied_logits(5, 4)
    out = prob_guided_maxout(x, logits, targets, scale)
    out.float().sum().backward()
    dropped = prob_guided_maxout_mask(x, logits, targets)
    assert scale.grad is not None and torch.isfinite(scale.grad)
    assert torch.all(x.grad[dropped] == 0) and torch.all(x.grad[~dropped] > 0)


def test_eval_is_the_identity_unless_active_in_eval():
    x, fc = torch.randn(4, 8), nn.Linear(8, 3)
    targets = torch.tensor([0, 1, 2, 0])
    layer = ProbGuidedMaxout().eval()
    assert layer(x) is x and layer(x, targets, fc) is x
    assert prob_guided_maxout(x, fc(x), targets, training=False) is x
    active = ProbGuidedMaxout(active_in_eval=True).eval()
    torch.testing.assert_close(active(x, targets, fc), ProbGuidedMaxout()(x, targets, fc))
    with pytest.raises(ValueError, match="eval with active_in_eval=True.*targets=None"):
        active(x)
    with pytest.raises(ValueError, match=r"active \(training\) but got targets=None.*backbone\(x, targets\)"):
        ProbGuidedMaxout()(x)
    assert repr(layer) == "ProbGuidedMaxout()" and "active_in_eval=True" in repr(active)


def test_drop_counters_are_device_tensors_that_add_up():
    layer, fc = ProbGuidedMaxout(), nn.Linear(16, 4)
    assert layer.last_dropped is None and layer.dropped_total is None
    expected = 0
    for seed in (0, 1):
        x = torch.randn(7, 16, generator=torch.Generator().manual_seed(seed))
        _, targets = varied_logits(7, 4, seed)
        fc.weight.data[targets] += 0.5 * x  # make some samples confident enough to drop units
        layer(x, targets, fc)
        dropped = int(transcription(x, fc(x), targets)[0].sum())
        expected += dropped
        assert isinstance(layer.last_dropped, torch.Tensor) and layer.last_dropped.dtype == torch.int64
        assert (int(layer.last_dropped), layer.last_seen) == (dropped, 7 * 16)
    assert expected > 0
    assert (int(layer.dropped_total), int(layer.seen_total)) == (expected, 2 * 7 * 16)
    layer.eval()(x)  # eval forwards are not counted
    assert int(layer.seen_total) == 2 * 7 * 16
    untracked = ProbGuidedMaxout(track_stats=False)
    untracked(x, targets, fc)
    assert untracked.last_dropped is None


@pytest.mark.parametrize(
    ("x", "logits", "targets", "match"),
    [
        (torch.randn(2, 3, 4, 4), torch.randn(2, 5), torch.tensor([0, 1]), r"shape \(N, D\), got shape \(2, 3, 4, 4\)"),
        (torch.randn(6), torch.randn(6, 5), torch.zeros(6, dtype=torch.int64), r"\(N, D\), got shape \(6,\)"),
        (torch.randn(2, 8), torch.randn(3, 5), torch.tensor([0, 1]), r"N = 2, got shape \(3, 5\)"),
        (torch.randn(2, 8), torch.randn(2, 5), torch.tensor([0.0, 1.0]), "integer dtype, got .* torch.float32"),
        (torch.randn(2, 8), torch.randn(2, 5), torch.tensor([0, 1, 2]), r"shape \(N,\) = \(2,\) .* got shape \(3,\)"),
    ],
)
def test_bad_inputs_are_named(x, logits, targets, match):
    with pytest.raises(ValueError, match=match):
        prob_guided_maxout(x, logits, targets)
    with pytest.raises(ValueError, match=match):
        ProbGuidedMaxout()(x, targets, lambda f: logits)
    if logits.shape[0] == x.shape[0]:  # checked before the real classifier would fail on x
        with pytest.raises(ValueError, match=match):
            ProbGuidedMaxout()(x, targets, nn.Linear(8, logits.shape[1]))


BACKBONES = {
    "FastCNN": partial(FastCNN, widths=(4, 8, 16)),
    "ResNet18": partial(ResNet18, width=4),
    "WRN-10-1": partial(WideResNet, depth=10, widen_factor=1),
}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_only_the_head_slot_takes_it(name):
    for slot in ("stage1", "block"):
        with pytest.raises(
            ValueError, match=f"slot '{slot}' .* ProbGuidedMaxout needs the targets .* put it in `head`"
        ):
            BACKBONES[name](slots={slot: ProbGuidedMaxout})
    assert BACKBONES[name](slots={"head": ProbGuidedMaxout}).needs_targets
    assert not BACKBONES[name](slots={"head": nn.Dropout}).needs_targets


def test_other_head_layers_ignore_the_targets():
    torch.manual_seed(0)
    net = FastCNN(widths=(4, 8, 16), slots={"head": partial(MaxDropout, 0.3, "sample")})
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.testing.assert_close(net(x, y), net(x), rtol=0, atol=0)


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
                dropped = transcription(x, classifier(x), targets)[0]
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
        {"class_path": "test_prob_guided_maxout.HeadCounter"},
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
