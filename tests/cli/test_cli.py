"""The `maxdrop` CLI end to end on tiny data: fit -> checkpoint -> test -> predict, reload, bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from maxdrop import MaxDropout
from maxdrop.cli import MaxdropCLI, main
from maxdrop.module import ClassificationModule
from tests.helpers.data import tiny_run_config, write_official_dir

TINY_CONFIG = tiny_run_config("DATA", trainer={"limit_train_batches": 3})


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when it gets args while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["maxdrop"])


@pytest.fixture
def run_dir(tmp_path, monkeypatch, tiny_tree) -> Path:
    """A working folder with tiny.yaml pointing at the tiny tree; lightning_logs/ lands here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TINY_CONFIG.replace("DATA", str(tiny_tree)))
    return tmp_path


def cli(*args: str) -> MaxdropCLI:
    return MaxdropCLI(args=list(args))


def error_of(capsys, *args: str) -> str:
    """Run `maxdrop ARGS`, expect exit status 2, return what it wrote to stderr."""
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("maxdrop: error: ")
    return " ".join(err.split())  # one paragraph, wrapped for the terminal


@pytest.mark.slow
def test_fit_checkpoint_test_predict_and_reload(run_dir):
    fit = cli("fit", "--config", "tiny.yaml")
    version = run_dir / "lightning_logs" / "version_0"
    # The run's config is saved with it, slots included, and checkpoints keep the last and the best.
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"]["init_args"]["slots"]["stage1"]["class_path"] == "maxdrop.MaxDropout"
    assert saved["seed_everything"] == 0
    ckpts = sorted(p.name for p in (version / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch") for n in ckpts)
    assert {"val/acc", "val/error", "train/loss_epoch"} <= set(fit.trainer.callback_metrics)
    last = version / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["hyper_parameters"]["num_classes"] == 10  # linked from the data
    assert ckpt["epoch"] == 1  # last.ckpt is the last epoch even when the best one came earlier

    # The checkpoint rebuilds exactly the trained model: same weights, same slots, same outputs.
    loaded = ClassificationModule.load_from_checkpoint(last)
    trained = fit.model
    assert loaded.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.state_dict().items())
    slots = loaded.backbone.dropout_slots()
    assert list(slots) == list(trained.backbone.dropout_slots()) == ["block.0", "stage1", "block.1"]
    assert isinstance(slots["stage1"], MaxDropout) and slots["stage1"].p == 0.3 and slots["block.0"].p == 0.1
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x), rtol=0, atol=0)

    # test on the checkpoint: the validation figures of the same weights on the same images (val_size 0).
    val = cli("validate", "--config", "tiny.yaml", "--data.init_args.val_size", "0", "--ckpt_path", str(last))
    test = cli("test", "--config", "tiny.yaml", "--ckpt_path", str(last))
    for key in ("acc", "error", "loss"):
        assert test.trainer.callback_metrics[f"test/{key}"] == pytest.approx(
            val.trainer.callback_metrics[f"val/{key}"].item()
        )

    pred = cli("predict", "--config", "tiny.yaml", "--ckpt_path", str(last))
    out = torch.load(Path(pred.trainer.log_dir) / "predictions.pt")
    assert out["preds"].shape == (20,) and out["probs"].shape == (20, 10)
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(20))
    assert torch.equal(out["preds"], out["probs"].argmax(1))


@pytest.mark.slow
def test_console_script_runs_fit_in_a_subprocess(run_dir):
    exe = Path(sys.executable).with_name("maxdrop")
    cmd = [str(exe), "fit", "--config", "tiny.yaml", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (run_dir / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_print_config_shows_every_key_with_the_overrides(run_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "tiny.yaml", "--model.init_args.label_smoothing", "0.1", "--print_config"])
    assert exc.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    model = cfg["model"]["init_args"]
    assert model["label_smoothing"] == 0.1
    assert model["backbone"]["init_args"]["slots"]["block"] == {
        "class_path": "torch.nn.Dropout",
        "init_args": {"p": 0.1, "inplace": False},
    }
    assert model["optimizer"]["init_args"]["lr"] == 0.05 and model["lr_scheduler"]["class_path"].endswith("MultiStepLR")
    assert cfg["checkpoint"]["monitor"] == "val/error" and cfg["checkpoint"]["save_last"] is True
    assert cfg["seed_everything"] == 0


def test_slots_command_lists_names_and_positions(capsys):
    main(["slots", "maxdrop.models.ResNet18"])
    out = capsys.readouterr().out
    for name in ("stage1", "stage4", "block", "head", "block.0", "block.7"):
        assert f"  {name} " in out
    assert "before global average pooling" in out
    main(["slots", "maxdrop.models.WideResNet", "--depth", "16", "--widen_factor", "2"])
    out = capsys.readouterr().out
    assert "block.5 " in out and "block.6" not in out and "depth=16" in out


@pytest.mark.parametrize("tool", ["grid", "report", "tune"])
def test_grid_and_report_are_maxdrop_commands(capsys, tool):
    with pytest.raises(SystemExit) as exc:
        main([tool, "--help"])
    assert exc.value.code == 0 and f"usage: maxdrop {tool}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["slots", "torch.nn.Linear"], "cannot build torch.nn.Linear with the arguments given"),
        (["slots", "maxdrop.models.NoSuchNet"], "cannot import 'maxdrop.models.NoSuchNet'"),
        (["fit", "--config", "missing.yaml"], "missing.yaml' does not exist (given to --config)"),
    ],
)
def test_bad_names_and_files_are_one_paragraph(capsys, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in error_of(capsys, *args)


def test_unknown_class_path(run_dir, capsys):
    err = error_of(capsys, "fit", "--config", "tiny.yaml", "--model.init_args.backbone", "maxdrop.models.NoSuchNet")
    assert "unknown class_path 'maxdrop.models.NoSuchNet' (in model.backbone)" in err


def test_bad_slot_name_lists_the_valid_ones(run_dir, capsys):
    err = error_of(
        capsys, "fit", "--config", "tiny.yaml",
        "--model.init_args.backbone.init_args.slots={stage7: {class_path: maxdrop.MaxDropout}}",
    )  # fmt: skip
    assert "no dropout slot 'stage7'" in err and "valid slots: stage1, stage2, stage3, block, head" in err


def test_missing_and_corrupt_checkpoints(run_dir, capsys):
    err = error_of(capsys, "test", "--config", "tiny.yaml", "--ckpt_path", "nope.ckpt")
    assert "checkpoint 'nope.ckpt' does not exist" in err
    (run_dir / "bad.ckpt").write_bytes(b"PK\x03\x04 not really a checkpoint")
    err = error_of(capsys, "test", "--config", "tiny.yaml", "--ckpt_path", "bad.ckpt")
    assert "checkpoint 'bad.ckpt' cannot be loaded" in err


@pytest.mark.slow
def test_checkpoint_for_other_classes_than_the_data(run_dir, capsys, tmp_path):
    """A CIFAR-100 model tested on CIFAR-10 data: a clear message, not a state_dict size mismatch."""
    c100 = write_official_dir(tmp_path / "c100", "cifar100", n_train=40, n_test=10)
    fit = cli(
        "fit", "--config", "tiny.yaml", "--data.init_args.dataset", "cifar100", "--data.init_args.data_dir",
        str(c100.parent), "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1",
    )  # fmt: skip
    last = Path(fit.trainer.checkpoint_callback.last_model_path)
    err = error_of(capsys, "test", "--config", "tiny.yaml", "--ckpt_path", str(last))
    assert "100 classes" in err and "10" in err
