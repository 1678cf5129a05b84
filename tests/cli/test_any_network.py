"""Any network through the CLI: the configs/any/ configs train and are monitored like a shipped backbone."""

import csv
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from maxdrop.callbacks import SparsityMonitor
from maxdrop.cli import MaxdropCLI, main
from maxdrop.experiments.report import report
from maxdrop.monitoring.hparams import run_hparams

ANY = Path(__file__).resolve().parents[2] / "configs" / "any"
TINY = [
    "--data.init_args.batch_size=8",
    "--data.init_args.val_size=10",
    "--data.init_args.cache=false",
    "--data.init_args.eval_batch_size=10",
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",  # the configs' one-cycle schedule needs 3 steps or more
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    monkeypatch.chdir(tmp_path)


def fit_counting(args: list[str]) -> tuple[MaxdropCLI, dict[str, int]]:
    """Fit, counting independently per slot the elements that entered nonzero and left zero in training."""
    cli = MaxdropCLI(args=args, run=False)
    counts: dict[str, int] = {}
    for name, layer in cli.model.backbone.dropout_slots().items():
        seen: dict[str, torch.Tensor] = {}

        def pre(mod, inp, seen=seen):
            seen["x"] = inp[0].detach().clone()

        def post(mod, inp, out, name=name, seen=seen):
            if mod.training:
                counts[name] = counts.get(name, 0) + int(((seen["x"] != 0) & (out == 0)).sum())

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, counts


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", ["resnet18_torchvision_maxdropout.yaml", "vit_tiny_topk_dropout.yaml", "resnet10t_timm_maxdropout.yaml"]
)
def test_any_config_trains_and_the_monitor_counts_every_drop(config, tiny_tree):
    pytest.importorskip("timm")
    cli, counts = fit_counting(["--config", str(ANY / config), f"--data.init_args.data_dir={tiny_tree}", *TINY])
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, SparsityMonitor))
    slots = list(cli.model.backbone.dropout_slots())
    assert slots and set(counts) == set(slots)
    for name in slots:
        assert monitor.logged[f"maxdrop/{name}/dropped"] == counts[name] > 0
    # A slot at several positions (stages.0 ... stages.3) is also reported summed over its positions.
    totals = {}
    for name in slots:
        slot, _, index = name.rpartition(".")
        if index.isdigit():
            totals[slot] = totals.get(slot, 0) + counts[name]
    for slot, total in totals.items():
        assert monitor.logged[f"maxdrop/{slot}/dropped"] == total
    # `maxdrop report` reads the wrapped model's run as any other: its slots' dropped fractions.
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)  # into the run's events
    report([Path(cli.trainer.log_dir).parent], Path("report"))
    with open("report/report.csv") as f:
        row = next(csv.DictReader(f))
    assert all(f"{name} " in row["dropped fraction, last epoch"] for name in [*slots, *totals])
    hp = run_hparams(cli.trainer, cli.model)
    assert hp["backbone"] == "WithSlots" and hp[f"slot/{slots[0]}"] in ("MaxDropout", "TopKDropout")
    assert hp["backbone/model"] == type(cli.model.backbone.model).__name__ in ("ResNet", "VisionTransformer")


@pytest.mark.parametrize(
    "config", ["resnet18_torchvision_maxdropout.yaml", "vit_tiny_topk_dropout.yaml", "resnet10t_timm_maxdropout.yaml"]
)
def test_the_baseline_without_layers_is_one_command_line_override(config, tiny_tree):
    # The comparison a user runs first: the same config with its slots emptied from the command line.
    pytest.importorskip("timm")
    base = ["--config", str(ANY / config), f"--data.init_args.data_dir={tiny_tree}", *TINY]
    with_layers = MaxdropCLI(args=base, run=False).model.backbone
    without = MaxdropCLI(args=[*base, "--model.init_args.backbone.init_args.slots={}"], run=False).model.backbone
    assert with_layers.dropout_slots() and not without.dropout_slots()
    # Everything else of the backbone is kept: the same wrapped network, parameter for parameter.
    assert without.model_name == with_layers.model_name
    shapes = {n: p.shape for n, p in without.model.named_parameters()}
    assert shapes == {n: p.shape for n, p in with_layers.model.named_parameters()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:SparsityMonitor.*no backbone with a dropout_slots:UserWarning")  # no slots here
def test_plain_torchvision_class_path_trains_and_reloads(tiny_tree, tmp_path):
    # In a config file: jsonargparse 4.53 fails to swap a class for a function class_path given on the
    # command line (`add_function_arguments() got an unexpected keyword argument 'linked_targets'`).
    config = yaml.safe_load((ANY / "resnet18_torchvision_maxdropout.yaml").read_text())
    config["model"]["init_args"]["backbone"] = {
        "class_path": "torchvision.models.resnet18",
        "init_args": {"num_classes": 10},
    }
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(config))
    cli = MaxdropCLI(args=["fit", "--config", "plain.yaml", f"--data.init_args.data_dir={tiny_tree}", *TINY])
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    loaded = type(cli.model).load_from_checkpoint(last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), cli.model.eval()(x), rtol=0, atol=0)


@pytest.mark.slow
def test_a_wrapped_model_that_diverges_stops_with_one_paragraph(capsys, tiny_tree):
    # The divergence guard reads the loss, whatever the backbone: a WithSlots torchvision ResNet-18 too.
    args = [
        "fit",
        "--config",
        str(ANY / "resnet18_torchvision_maxdropout.yaml"),
        f"--data.init_args.data_dir={tiny_tree}",
    ]
    args += [*TINY, "--model.init_args.optimizer.init_args.lr=1e6", "--model.init_args.lr_scheduler=null"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "training diverged at step" in err and "Lower the learning rate" in err


def test_a_model_of_another_width_is_refused_with_both_numbers(capsys, tiny_tree, tmp_path):
    config = yaml.safe_load((ANY / "resnet18_torchvision_maxdropout.yaml").read_text())
    config["model"]["init_args"]["backbone"]["init_args"]["model"] = {"class_path": f"{__name__}.fixed_width"}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "wide.yaml", f"--data.init_args.data_dir={tiny_tree}"])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "gives 1000 outputs" in err and "num_classes=10" in err


def fixed_width() -> torch.nn.Module:
    """A factory that takes no num_classes: its 1000 outputs stay."""
    import torchvision

    return torchvision.models.resnet18()


class RandomImages(pl.LightningDataModule):
    """A data module of the tests' own: 3 classes of random 3x16x16 images. What the CLI needs from a data
    module: the Lightning dataloaders and a ``num_classes`` attribute (linked into the model)."""

    def __init__(self, n: int = 24, num_classes: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % num_classes)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=8)


@pytest.mark.slow
def test_any_lightning_datamodule_replaces_the_cifar_one(tmp_path):
    config = yaml.safe_load((ANY / "resnet18_torchvision_maxdropout.yaml").read_text())
    backbone = config["model"]["init_args"]["backbone"]["init_args"]
    backbone["model"]["init_args"]["num_classes"] = 3
    backbone["input_size"] = [3, 16, 16]
    config["data"] = {"class_path": f"{__name__}.RandomImages"}
    (tmp_path / "own_data.yaml").write_text(yaml.safe_dump(config))
    cli, counts = fit_counting(["--config", "own_data.yaml", *[a for a in TINY if a.startswith("--trainer")]])
    assert cli.model.num_classes == 3 and cli.model.backbone.model.fc.out_features == 3
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, SparsityMonitor))
    assert monitor.logged["maxdrop/stages.0/dropped"] == counts["stages.0"] > 0


def test_slots_lists_every_position_of_any_model(capsys):
    main(["slots", str(ANY / "resnet18_torchvision_maxdropout.yaml")])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:] if line.strip()}
    assert rows["layer1.0.relu_1"][1:4] == ["ReLU", "64x8x8", "2"]
    assert rows["layer4"][-2:] == ["stages.3", "(after)"] and rows["layer4"][2] == "512x1x1"
    assert list(rows).index("layer1.0.relu") < list(rows).index("layer1.0.relu_1") < list(rows).index("fc")
