"""Faults end with a message a user can act on: a diverged loss, a resume whose schedule cannot
continue, a checkpoint of another backbone; the monitor counts NaN activations instead of failing."""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from maxdrop import ProbGuidedMaxout
from maxdrop.callbacks import SparsityMonitor, load_sparsity_summary
from maxdrop.cli import main
from maxdrop.models import FastCNN, ResNet18
from maxdrop.module import ClassificationModule
from tests.helpers.data import tiny_run_config

ONE_CYCLE = {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.05}}


class NaNAfter(nn.Module):
    """A slot layer that passes its input through for ``after`` training forwards, then returns NaN."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                return x * float("nan")
        return x


class StopAfterEpochs(pl.Callback):
    """Ends a fit after ``epochs`` epochs, as a cluster job killed and requeued would stop."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["maxdrop"])


def _write(tmp_path: Path, tiny_tree: Path, name: str = "run.yaml", **kw) -> str:
    path = tmp_path / name
    path.write_text(tiny_run_config(str(tiny_tree), **kw))
    return str(path)


def _logger(root: Path, version: str) -> str:
    init = {"save_dir": str(root), "name": "runs", "version": version}
    return json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": init})


def _fails(capsys, status: int, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == status
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("maxdrop: error: "), err
    return " ".join(err.split())


def test_huge_learning_rate_stops_with_one_paragraph(tmp_path, tiny_tree, capsys):
    """The reported case: lr 1e6 without a schedule used to end in the monitor's histogram error."""
    cfg = _write(tmp_path, tiny_tree)
    err = _fails(
        capsys, 1, "fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "lr"),
        "--model.init_args.optimizer.init_args.lr", "1e6", "--model.init_args.lr_scheduler", "null",
    )  # fmt: skip
    assert "training diverged at step" in err and "learning rate 1e+06" in err
    assert "Lower the learning rate" in err and "histogram" not in err


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, tiny_tree, capsys):
    # 30 training images in batches of 8: 4 steps per epoch; NaN from the 7th step (epoch 1).
    slots = {"stage1": {"class_path": f"{__name__}.NaNAfter", "init_args": {"after": 6}}}
    cfg = _write(tmp_path, tiny_tree, slots=slots, trainer={"max_epochs": 3})
    err = _fails(capsys, 1, "fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "nan"))
    assert "training diverged at step 7 (epoch 1, batch 2): the loss is nan" in err
    assert "the last finite loss was" in err and "at step 6" in err
    last = tmp_path / "runs" / "nan" / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is {last}" in err
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_monitor_counts_nonfinite_inputs_and_skips_them_in_histograms(tmp_path):
    slots = {"stage1": partial(NaNAfter, 2), "head": partial(nn.Dropout, 0.1)}
    module = ClassificationModule(backbone=partial(FastCNN, widths=(4, 8, 8), slots=slots), lr_scheduler=None)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    )
    monitor = SparsityMonitor()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=1, limit_val_batches=0, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[monitor],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))  # no error, although the loss is NaN
    records = {r["slot"]: r for r in load_sparsity_summary(tmp_path / "lightning_logs" / "version_0")["records"]}
    # stage1 outputs NaN from step 3 on (head's input: 2 batches); its own input turns NaN at step 4, once
    # the NaN step has poisoned the weights (1 batch).
    assert records["stage1"]["nonfinite"] == 1 and records["head"]["nonfinite"] == 2
    assert monitor.logged["maxdrop/head/nonfinite"] == 2


def _two_epochs_of_three(tmp_path: Path, cfg: str, version: str) -> tuple[list[str], Path]:
    """A 3-epoch fit stopped after 2 epochs: its command and its last.ckpt."""
    stop = json.dumps({"class_path": f"{__name__}.StopAfterEpochs", "init_args": {"epochs": 2}})
    common = ["fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, version)]
    main([*common, f"--trainer.callbacks+={stop}"])
    last = tmp_path / "runs" / version / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    return common, last


@pytest.mark.slow
def test_one_cycle_resume_with_another_length_is_refused_before_training(tmp_path, tiny_tree, capsys):
    cfg = _write(tmp_path, tiny_tree, lr_scheduler=ONE_CYCLE, trainer={"max_epochs": 3})
    common, last = _two_epochs_of_three(tmp_path, cfg, "cycle")
    before = last.read_bytes()
    err = _fails(capsys, 2, *common, "--ckpt_path", str(last), "--trainer.max_epochs", "4")
    assert (
        f"cannot resume from {last}: its learning-rate schedule was built for 12 optimizer steps" in err
        and "this run would take 16 (max_epochs=4, 4 steps per epoch)" in err
        and "Resume with the same length (--trainer.max_epochs 3)" in err
        and "start a new run from the checkpoint's weights" in err
    )
    assert last.read_bytes() == before  # no training step, no checkpoint written


@pytest.mark.slow
def test_one_cycle_resume_with_the_same_length_is_bitwise_exact(tmp_path, tiny_tree):
    cfg = _write(tmp_path, tiny_tree, lr_scheduler=ONE_CYCLE, trainer={"max_epochs": 3})
    main(["fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "straight")])
    common, resumed = _two_epochs_of_three(tmp_path, cfg, "resumed")
    main([*common, "--ckpt_path", str(resumed)])  # the same max_epochs: the SLURM requeue case
    straight = torch.load(tmp_path / "runs" / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    after = torch.load(resumed, weights_only=False)
    assert after["epoch"] == straight["epoch"] == 2
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, after["state_dict"][k]), k


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        pytest.param(
            partial(ResNet18, width=4),
            "key(s) only in the checkpoint, first backbone.",
            id="another backbone",
        ),
        pytest.param(
            partial(FastCNN, widths=(4, 8, 8), slots={"head": ProbGuidedMaxout}),
            "1 key(s) only in this model, first backbone.",
            id="another slot layout",
        ),
    ],
)
def test_checkpoint_of_another_backbone_names_the_keys(tmp_path, tiny_tree, backbone, expected):
    """(The CLI rebuilds the checkpoint's own model from its hyperparameters; this is the Python path.)"""

    cfg = _write(tmp_path, tiny_tree, trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1})
    main(["fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "fast")])
    last = tmp_path / "runs" / "fast" / "checkpoints" / "last.ckpt"
    model = ClassificationModule(backbone=backbone, lr_scheduler=None)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="the checkpoint does not fit this model") as err:
        trainer.test(model, torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=last)
    message = str(err.value)
    assert expected in message
    assert (
        "it was trained with the backbone maxdrop.models.FastCNN with slots {'stage1': 'maxdrop.MaxDropout'" in message
    )
    assert f"this model has {backbone.func.__name__};" in message
