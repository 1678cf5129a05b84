"""Input that is wrong before the run starts is a usage error (exit 2, one paragraph); anything raised once the
run has started is a failed run (exit 1, its traceback above one paragraph); logger-less runs and short
one-cycle runs work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from maxdrop.cli import main
from tests.helpers.data import tiny_run_config

ONE_CYCLE = {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.05, "pct_start": 0.25}}


class FailsAtStep(pl.Callback):
    """A callback with a bug that shows at training step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyError("no_such_metric")


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["maxdrop"])


def _config(tmp_path: Path, tiny_tree: Path, **kw) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(tiny_run_config(str(tiny_tree), **kw))
    return str(path)


def _logger(root: Path, version: str) -> str:
    init = {"save_dir": str(root), "name": "runs", "version": version}
    return json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": init})


def _exit_status(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err


def test_an_error_in_a_callback_mid_fit_is_a_failed_run_with_its_traceback(tmp_path, tiny_tree, capsys):
    cfg = _config(tmp_path, tiny_tree, trainer={"max_epochs": 2, "limit_val_batches": 1})
    bug = json.dumps({"class_path": f"{__name__}.FailsAtStep", "init_args": {"step": 6}})
    status, err = _exit_status(
        capsys, "fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "bug"), f"--trainer.callbacks+={bug}"
    )
    assert status == 1
    traceback, _, last = err.rstrip().rpartition("maxdrop: error: ")
    assert "Traceback (most recent call last)" in traceback and 'raise KeyError("no_such_metric")' in traceback
    message = " ".join(last.split())
    ckpt = tmp_path / "runs" / "bug" / "checkpoints" / "last.ckpt"
    assert message.startswith("the run failed at step 6 (epoch 1) with KeyError: 'no_such_metric'")
    assert f"The last checkpoint is {ckpt} (resume with --ckpt_path {ckpt})" in message


def test_a_truncated_checkpoint_gets_the_documented_message(tmp_path, tiny_tree, capsys):
    cfg = _config(tmp_path, tiny_tree, trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1})
    main(["fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "v")])
    last = tmp_path / "runs" / "v" / "checkpoints" / "last.ckpt"
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(last.read_bytes()[:20_000])
    status, err = _exit_status(capsys, "test", "--config", cfg, "--ckpt_path", str(cut))
    message = " ".join(err.split())
    assert status == 2 and "Traceback" not in err
    assert message.startswith(
        f"maxdrop: error: checkpoint '{cut}' cannot be loaded: it is not a valid Lightning checkpoint or is "
        "truncated or corrupt ("
    ), message


def test_logger_false_fits_and_logger_only_callbacks_step_aside_with_one_warning(tmp_path, tiny_tree, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callbacks = [
        {"class_path": "maxdrop.callbacks.SparsityMonitor"},
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    ]
    cfg = _config(tmp_path, tiny_tree, trainer={"max_epochs": 1, "limit_val_batches": 1, "callbacks": callbacks})
    with pytest.warns(UserWarning) as record:
        main(["fit", "--config", cfg, "--trainer.logger", "false"])
    ours = [str(w.message) for w in record if "no logger" in str(w.message)]
    assert ours == [
        "no logger (trainer.logger is false): CustomScalarsLayout, HParamsSession, LearningRateMonitor only log "
        "and are off for this run"
    ]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0


def test_guards_are_in_the_saved_config_and_can_be_switched_off(tmp_path, tiny_tree):
    cfg = _config(tmp_path, tiny_tree, trainer={"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1})
    main(
        ["fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "off"), "--hparams.enabled", "false",
         "--divergence.check_every_n_steps", "7"]
    )  # fmt: skip
    saved = yaml.safe_load((tmp_path / "runs" / "off" / "config.yaml").read_text())
    assert saved["divergence"] == {"enabled": True, "check_every_n_steps": 7}
    assert saved["tensorboard_layout"] == {"enabled": True} and saved["hparams"] == {"enabled": False}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs" / "off")).Reload()
    assert not any("hparams" in tag for tag in events.Tags()["tensors"])  # no HParams session written


@pytest.mark.slow
def test_four_batch_one_epoch_quickstart_fit_runs(tmp_path, cifar10_jpeg, cifar10_cache, monkeypatch):
    """The smoke run everyone starts with: a one-cycle schedule of 4 steps (its warm-up would be 0 steps)."""
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    main(
        ["fit", "--config", str(config), "--data.data_dir", str(cifar10_jpeg), "--data.init_args.cache_dir",
         str(cifar10_cache), "--trainer.limit_train_batches", "4",
         "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "2",
         "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
    )  # fmt: skip
    last = torch.load(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["lr_schedulers"][0]["total_steps"] == 4


def test_a_one_cycle_schedule_too_short_for_its_phases_is_refused_before_training(tmp_path, tiny_tree, capsys):
    cfg = _config(tmp_path, tiny_tree, lr_scheduler=ONE_CYCLE, trainer={"max_epochs": 1, "limit_train_batches": 2})
    status, err = _exit_status(capsys, "fit", "--config", cfg, "--trainer.logger", _logger(tmp_path, "short"))
    message = " ".join(err.split())
    assert status == 2 and "Traceback" not in err
    assert (
        "OneCycleLR cannot be built for a run of 2 optimizer step(s): each of its 2 phases needs at least one "
        "step, so it needs 3 or more" in message
    )
    assert not (tmp_path / "runs" / "short" / "checkpoints").exists()
