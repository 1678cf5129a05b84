"""Every YAML under configs/ builds its model, datamodule and trainer, and says what the paper's table says."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torch import nn

from maxdrop import MaxDropout
from maxdrop.callbacks import SparsityMonitor
from maxdrop.cli import MaxdropCLI
from maxdrop.data import CIFARDataModule
from maxdrop.models import FastCNN, ResNet18, WideResNet
from maxdrop.module import ClassificationModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PARTS = ("data", "model", "trainer")  # folders of config parts, composed by the files in paper/
FULL = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in PARTS)

# The paper's table: (backbone, dataset, variant) -> (slot layer per filled slot position, Cutout length or 0).
PAPER_ROWS = {
    f"{net}_{ds}_{variant}": (net, ds, variant)
    for net in ("resnet18", "wrn28_10")
    for ds in ("cifar10", "cifar100")
    for variant in ("baseline", "dropout", "maxdropout", "cutout", "cutout_maxdropout")
    if not (net == "resnet18" and variant == "dropout")
}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when it gets args while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["maxdrop"])


def build(config: Path, *extra: str) -> MaxdropCLI:
    """Parse and instantiate a config as `maxdrop fit --config ...` would, without running it."""
    return MaxdropCLI(args=["--config", str(config), "--data.init_args.data_dir", "no/data/needed", *extra], run=False)


def test_every_part_is_used_by_a_full_config():
    used = set()
    for path in FULL:
        for key, value in yaml.safe_load(path.read_text()).items():
            if key in PARTS and isinstance(value, str):
                part = (path.parent / value).resolve()
                assert part.is_file(), f"{path.name}: {key} -> {value} does not exist"
                used.add(part)
    parts = {p.resolve() for p in CONFIGS.rglob("*.yaml") if p.parent.name in PARTS}
    assert parts and parts <= used, f"parts no full config uses: {sorted(map(str, parts - used))}"


def test_the_paper_table_has_one_config_per_row():
    assert {p.stem for p in (CONFIGS / "paper").glob("*.yaml")} == set(PAPER_ROWS)
    assert (CONFIGS / "quickstart.yaml") in FULL


def _monitoring_and_checkpointing(cli: MaxdropCLI) -> None:
    callbacks = cli.trainer.callbacks
    assert any(isinstance(c, SparsityMonitor) for c in callbacks)
    ckpt = next(c for c in callbacks if isinstance(c, ModelCheckpoint))
    assert (ckpt.monitor, ckpt.mode, ckpt.save_last) == ("val/error", "min", True)


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(PAPER_ROWS))
def test_paper_row_builds_what_the_paper_ran(row, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net, ds, variant = PAPER_ROWS[row]
    cli = build(CONFIGS / "paper" / f"{row}.yaml")
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, ClassificationModule) and isinstance(dm, CIFARDataModule)
    n_classes = 10 if ds == "cifar10" else 100
    assert dm.dataset == ds and dm.num_classes == n_classes == model.num_classes
    assert dm.batch_size == 128 and dm.augment.crop_padding == 4 and dm.augment.hflip
    cutout = {"cifar10": 16, "cifar100": 8}[ds] if "cutout" in variant else 0
    assert (dm.augment.cutout_holes, dm.augment.cutout_length if cutout else 0) == ((1, cutout) if cutout else (0, 0))
    backbone = model.backbone
    if net == "resnet18":
        assert type(backbone) is ResNet18 and sum(p.numel() for p in backbone.parameters()) > 11e6
        expected = [f"stage{s}" for s in range(1, 5)] if "maxdropout" in variant else []
    else:
        assert type(backbone) is WideResNet and len(backbone.slot_positions()) == 12 + 3 + 1
        expected = [f"block.{i}" for i in range(12)] if "dropout" in variant else []
    slots = backbone.dropout_slots()
    assert list(slots) == expected
    layer_type = nn.Dropout if variant == "dropout" else MaxDropout
    assert all(type(m) is layer_type and m.p == 0.3 for m in slots.values())
    assert backbone.fc.out_features == n_classes
    # The paper's recipe.
    assert cli.trainer.max_epochs == 200
    opt = model.optimizer_factory([nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    sched = model.lr_scheduler_factory(opt)
    assert isinstance(sched, torch.optim.lr_scheduler.MultiStepLR)
    assert dict(sched.milestones) == {60: 1, 120: 1, 160: 1} and sched.gamma == 0.2
    assert model.label_smoothing == 0.0
    _monitoring_and_checkpointing(cli)


def test_quickstart_builds_a_maxdropout_fastcnn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(CONFIGS / "quickstart.yaml")
    backbone = cli.model.backbone
    assert type(backbone) is FastCNN
    assert list(backbone.dropout_slots()) == ["stage1", "stage2", "stage3"]
    assert all(isinstance(m, MaxDropout) for m in backbone.dropout_slots().values())
    assert cli.datamodule.loader == "tensor" and cli.datamodule.num_classes == 10
    assert any(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
    _monitoring_and_checkpointing(cli)


def test_any_key_of_a_shipped_config_can_be_overridden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(
        CONFIGS / "quickstart.yaml",
        "--trainer.max_epochs=1",
        "--model.init_args.label_smoothing=0.1",
        "--data.init_args.batch_size=64",
        "--model.init_args.backbone.init_args.widths=[8,16]",
        "--model.init_args.backbone.init_args.slots={stage1: {class_path: torch.nn.Dropout2d, init_args: {p: 0.2}}}",
    )
    assert cli.trainer.max_epochs == 1 and cli.model.label_smoothing == 0.1 and cli.datamodule.batch_size == 64
    slots = cli.model.backbone.dropout_slots()
    assert list(slots) == ["stage1"] and type(slots["stage1"]) is nn.Dropout2d and slots["stage1"].p == 0.2


@pytest.mark.slow
def test_quickstart_reaches_60_percent_on_the_real_cifar10_and_test_agrees(
    cifar10_jpeg, cifar10_cache, tmp_path, monkeypatch
):
    """The README's main job: fit the quickstart on the real CIFAR-10, then `maxdrop test` its checkpoint."""
    monkeypatch.chdir(tmp_path)
    data = ["--data.data_dir", str(cifar10_jpeg), "--data.init_args.cache_dir", str(cifar10_cache)]
    quiet = ["--trainer.enable_progress_bar", "false"]
    fit = MaxdropCLI(args=["fit", "--config", str(CONFIGS / "quickstart.yaml"), *data, *quiet])
    val_acc = fit.trainer.callback_metrics["val/acc"].item()  # quickstart validates on the test split
    assert val_acc >= 0.60
    last = fit.trainer.checkpoint_callback.last_model_path
    test = MaxdropCLI(args=["test", "--config", str(CONFIGS / "quickstart.yaml"), *data, *quiet, "--ckpt_path", last])
    assert test.trainer.callback_metrics["test/acc"].item() == pytest.approx(val_acc, abs=1e-6)


STUDY = sorted((CONFIGS / "study").glob("*.yaml"))
FRAGMENTS = sorted([*(CONFIGS / "cluster").glob("*.yaml"), CONFIGS / "speed" / "gpu_fast.yaml"])


@pytest.mark.parametrize("config", STUDY, ids=lambda p: p.stem)
def test_study_configs_build_and_differ_from_the_baseline_only_in_slots_and_augmentation(config, tmp_path, monkeypatch):
    from maxdrop.experiments.report import DEFAULT_COMPARED, config_key

    monkeypatch.chdir(tmp_path)
    cli = build(config)
    assert isinstance(cli.model.backbone, FastCNN)
    assert any(isinstance(cb, SparsityMonitor) for cb in cli.trainer.callbacks)
    # The resolved configs: a row file names its shared parts (base/*.yaml) by path.
    base = config_key(_saved_config(build(CONFIGS / "study" / "no_dropout.yaml")))
    this = config_key(_saved_config(cli))
    differ = {k for k in base.keys() | this.keys() if base.get(k) != this.get(k)}
    assert all(any(k.startswith(c) for c in DEFAULT_COMPARED) for k in differ), differ


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.stem)
def test_cluster_and_speed_fragments_compose_with_a_paper_row(fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(CONFIGS / "paper" / "resnet18_cifar10_maxdropout.yaml", "--config", str(fragment))
    assert isinstance(cli.model.backbone, ResNet18) and len(cli.model.backbone.dropout_slots()) == 4
    if fragment.stem == "ddp":
        assert cli.datamodule.global_batch_size == 128 and cli.datamodule.per_device_batch_size() == 128
        assert type(cli.trainer.strategy).__name__ == "DDPStrategy"
    else:
        assert cli.model.channels_last and cli.model.compile_backbone
        assert cli.trainer.precision == "bf16-mixed" and cli.datamodule.data_on_device


def test_time_to_94_config_builds_with_the_fast_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build(CONFIGS / "speed" / "resnet18_cifar10_94.yaml", "--config", str(CONFIGS / "speed" / "gpu_fast.yaml"))
    assert isinstance(cli.model.backbone, ResNet18) and len(cli.model.backbone.dropout_slots()) == 4
    assert cli.model.compile_backbone and cli.trainer.precision == "bf16-mixed"
    assert {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")} >= {
        "speed/resnet18_cifar10_94.yaml",
        "speed/gpu_fast.yaml",
        "cluster/ddp.yaml",
    }


STUDY2 = sorted([*(CONFIGS / "study2").glob("*.yaml"), *(CONFIGS / "study2" / "p_sweep").glob("*.yaml")])
STUDY2_SIZES = {"n100": (100, 40), "n250": (250, 40)}  # size file -> (images per class, epochs)


def _study2_build(config: Path, size: str) -> MaxdropCLI:
    return build(config, "--config", str(CONFIGS / "study2" / "size" / f"{size}.yaml"))


_STUDY2_BASELINE: dict[str, dict] = {}  # size -> the baseline's saved config, built once


def _saved_config(cli: MaxdropCLI) -> dict:
    """The config as a run's config.yaml holds it (what `maxdrop report` compares)."""
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


@pytest.mark.parametrize("size", sorted(STUDY2_SIZES))
@pytest.mark.parametrize("config", STUDY2, ids=lambda p: p.stem)
def test_study2_rows_differ_from_the_baseline_only_in_slots_and_augmentation(config, size, tmp_path, monkeypatch):
    from maxdrop.experiments.report import DEFAULT_COMPARED, config_key

    monkeypatch.chdir(tmp_path)
    cli = _study2_build(config, size)
    per_class, epochs = STUDY2_SIZES[size]
    dm = cli.datamodule
    assert (dm.train_per_class, dm.subset_seed, dm.val_size, cli.trainer.max_epochs) == (per_class, 0, 2000, epochs)
    assert isinstance(cli.model.backbone, FastCNN) and cli.model.label_smoothing == 0.0
    assert any(isinstance(cb, SparsityMonitor) for cb in cli.trainer.callbacks)
    assert (dm.augment.cutout_holes == 1) == ("cutout" in config.stem)
    if size not in _STUDY2_BASELINE:
        _STUDY2_BASELINE[size] = _saved_config(_study2_build(CONFIGS / "study2" / "no_dropout.yaml", size))
    ours, theirs = config_key(_saved_config(cli)), config_key(_STUDY2_BASELINE[size])
    differ = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert all(any(k.startswith(c) for c in DEFAULT_COMPARED) for k in differ), differ
    filled = cli.model.backbone.dropout_slots()
    assert (len(filled) == 0) == (config.stem in ("no_dropout", "cutout"))
