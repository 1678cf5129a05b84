"""ClassificationModule: loss, metrics as the paper reports them, optimizers, schedulers, predict, checkpoints."""

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maxdrop import MaxDropout
from maxdrop.models import FastCNN, ResNet18
from maxdrop.module import ClassificationModule

TINY = partial(FastCNN, widths=(4, 8))


class FixedLogits(nn.Module):
    """A 'backbone' whose logits are the first num_classes input values: predictions chosen by the test."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1)[:, : self.num_classes] * self.w


class DataWithClasses(pl.LightningDataModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), batch_size=4)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**defaults, **kwargs})


def test_default_is_the_paper_recipe():
    module = ClassificationModule()
    assert type(module.backbone) is ResNet18 and module.backbone.fc.out_features == 10
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    assert isinstance(sched["scheduler"], torch.optim.lr_scheduler.MultiStepLR) and sched["interval"] == "epoch"
    assert dict(sched["scheduler"].milestones) == {60: 1, 120: 1, 160: 1} and sched["scheduler"].gamma == 0.2
    assert sum(p.numel() for p in module.parameters()) == 11_173_962


def test_accuracy_and_error_rate_are_logged_as_the_paper_reports_them():
    # 4 samples, 10 classes; the argmax is the position of the 5.0: three right, one wrong.
    x = torch.zeros(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3])
    for i, pred in enumerate([0, 1, 2, 7]):
        x.view(4, -1)[i, pred] = 5.0
    module = ClassificationModule(backbone=FixedLogits, num_classes=10)
    (metrics,) = trainer().validate(module, DataLoader(TensorDataset(x, labels), batch_size=3), verbose=False)
    assert metrics["val/acc"] == pytest.approx(0.75)
    assert metrics["val/error"] == pytest.approx(25.0)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(x.view(4, -1)[:, :10], labels).item(), rel=1e-6)
    assert "val/acc_top5" not in metrics


def test_top5_with_100_classes_and_test_names():
    x = torch.zeros(2, 3, 32, 32)
    x.view(2, -1)[0, :5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # label 0 is 5th best: top-5 hit, top-1 miss
    x.view(2, -1)[1, 50] = 1.0  # label 99 is nowhere near the top 5
    module = ClassificationModule(backbone=FixedLogits, num_classes=100)
    (metrics,) = trainer().test(module, DataLoader(TensorDataset(x, torch.tensor([0, 99]))), verbose=False)
    assert metrics["test/acc"] == 0.0 and metrics["test/error"] == 100.0
    assert metrics["test/acc_top5"] == pytest.approx(0.5) and metrics["test/error_top5"] == pytest.approx(50.0)


def test_label_smoothing_changes_the_loss():
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    module = ClassificationModule(backbone=FixedLogits, label_smoothing=0.2)
    (metrics,) = trainer().validate(module, DataLoader(TensorDataset(x, y), batch_size=6), verbose=False)
    expected = F.cross_entropy(x.view(6, -1)[:, :10], y, label_smoothing=0.2).item()
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-6)


def test_predict_returns_classes_and_probabilities():
    module = ClassificationModule(backbone=TINY).eval()
    x = torch.randn(5, 3, 32, 32)
    for batch in (x, (x,), [x, torch.zeros(5, dtype=torch.long)]):
        out = module.predict_step(batch, 0)
        assert out["preds"].shape == (5,) and out["preds"].dtype == torch.int64
        assert out["probs"].shape == (5, 10)
        torch.testing.assert_close(out["probs"].sum(1), torch.ones(5))
        assert torch.equal(out["preds"], module(x).argmax(1))


def test_scheduler_with_total_steps_gets_the_run_length_and_steps_per_batch():
    data = DataLoader(TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))), batch_size=4)
    module = ClassificationModule(
        backbone=TINY,
        optimizer=partial(torch.optim.SGD, lr=0.5),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.5, pct_start=0.5),
    )
    t = trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0)
    t.fit(module, data)
    sched = t.lr_scheduler_configs[0]
    assert sched.interval == "step" and sched.scheduler.total_steps == 6
    assert sched.scheduler.last_epoch == 6  # stepped once per optimizer step


def test_optimizer_and_scheduler_given_as_config_entries():
    module = ClassificationModule(
        backbone=TINY,
        optimizer={"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        lr_scheduler=None,
    )
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="cannot import class_path 'torch.optim.Nope'"):
        ClassificationModule(backbone=TINY, optimizer={"class_path": "torch.optim.Nope"})


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="gives 10 outputs per image but the data has num_classes=100"):
        ClassificationModule(backbone=ResNet18(width=4), num_classes=100)  # a built network: its width is checked
    with pytest.raises(TypeError, match="backbone must build an nn.Module, got int"):
        ClassificationModule(backbone=lambda: 3)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        ClassificationModule(backbone=TINY, label_smoothing=1.5)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        ClassificationModule(backbone=TINY, num_classes=0)
    with pytest.raises(ValueError, match="lr_scheduler_interval must be"):
        ClassificationModule(backbone=TINY, lr_scheduler_interval="batch")


def test_num_classes_must_match_the_data():
    module = ClassificationModule(backbone=TINY, num_classes=10)
    with pytest.raises(ValueError, match="model has num_classes=10 but the data has 100 classes"):
        trainer(max_epochs=1).fit(module, datamodule=DataWithClasses(100))


def test_python_checkpoint_reloads_the_same_model_with_its_slots(tmp_path):
    backbone = partial(FastCNN, widths=(4, 8, 8), slots={"stage1": partial(MaxDropout, 0.2), "head": nn.Dropout})
    module = ClassificationModule(backbone=backbone, num_classes=10)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), batch_size=4)
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(module, data)
    t.save_checkpoint(tmp_path / "m.ckpt")
    # Python-built hparams hold the factories themselves, which only a full (trusted) unpickle restores.
    loaded = ClassificationModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    assert loaded.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.state_dict().items())
    slots = loaded.backbone.dropout_slots()
    assert list(slots) == ["stage1", "head"] and slots["stage1"].p == 0.2
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), module.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"does not fit this model \(backbone.fc.weight is \(10, 8\) there and \(100"):
        ClassificationModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False, num_classes=100)


def test_compiled_and_channels_last_training_saves_plain_checkpoints(tmp_path):
    """torch.compile after the strategy wrapped the model; the checkpoint loads into an uncompiled model."""
    backbone = partial(FastCNN, widths=(4, 8, 8), slots={"stage1": partial(MaxDropout, 0.3)})
    torch.manual_seed(0)
    fast = ClassificationModule(
        backbone=backbone, channels_last=True, compile=True, compile_kwargs={"backend": "aot_eager"}
    )
    data = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))), batch_size=8)
    t = trainer(max_epochs=1, limit_val_batches=0)
    t.fit(fast, data)
    assert "_compiled_backbone" in fast.__dict__  # training really ran through the compiled backbone
    assert fast.backbone.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    t.save_checkpoint(tmp_path / "fast.ckpt")
    keys = torch.load(tmp_path / "fast.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    plain = ClassificationModule.load_from_checkpoint(
        tmp_path / "fast.ckpt", weights_only=False, compile=False, channels_last=False
    )
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(plain.eval()(x), fast.eval()(x))
    # one training step of both from the same weights and batch: the compiled path computes the same
    torch.manual_seed(1)
    reference = ClassificationModule(backbone=backbone)
    reference.load_state_dict(plain.state_dict())
    xb, yb = next(iter(data))
    g_fast = torch.autograd.grad(F.cross_entropy(fast.train()(xb), yb), list(fast.backbone.parameters()))
    g_ref = torch.autograd.grad(F.cross_entropy(reference.train()(xb), yb), list(reference.backbone.parameters()))
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_test_pass_logs_calibration_error_and_nll():
    # Sample 0: right with confidence 0.9; sample 1: wrong with confidence 0.55 (bins 13 and 8 of 15).
    x = torch.zeros(2, 3, 32, 32)
    logits = x.view(2, -1)[:, :10]
    for i, (cls, conf) in enumerate([(0, 0.9), (5, 0.55)]):
        logits[i, cls] = torch.tensor(conf * 9 / (1 - conf)).log()  # softmax of (a, 0 x 9) gives a's class conf
    labels = torch.tensor([0, 1])
    module = ClassificationModule(backbone=FixedLogits, num_classes=10)
    (metrics,) = trainer().test(module, DataLoader(TensorDataset(x, labels), batch_size=1), verbose=False)
    assert metrics["test/ece"] == pytest.approx(((1 - 0.9) + (0.55 - 0)) / 2, abs=1e-5)
    assert metrics["test/nll"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    (val,) = trainer().validate(module, DataLoader(TensorDataset(x, labels)), verbose=False)
    assert "val/ece" not in val and "test/ece" not in val
