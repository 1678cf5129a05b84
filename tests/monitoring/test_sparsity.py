"""SparsityMonitor: figures equal independent counts, TensorBoard tags, summary file, bad input."""

from __future__ import annotations

import json
import re
import warnings
from contextlib import contextmanager
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import DropBlock2d

from maxdrop import MaxDropout, MaxDropoutV2
from maxdrop.callbacks import SUMMARY_FORMAT, SparsityMonitor, find_dropout_slots, load_sparsity_summary
from maxdrop.models import FastCNN, ResNet18, WideResNet
from tests.helpers.monitoring import (
    CHANNELS,
    SLOT_NAMES,
    RecordedClassifier,
    TinyBackbone,
    TinyModule,
    images,
    make_trainer,
    read_events,
)


def loader(n: int = 48, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=batch_size)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two epochs (4 training and 2 validation batches each) with the monitor; steps every 2 batches."""
    root = tmp_path_factory.mktemp("fit")
    torch.manual_seed(0)
    monitor = SparsityMonitor(log_every_n_batches=2)
    module = TinyModule()
    trainer = make_trainer(root, monitor, limit_train_batches=4, limit_val_batches=2)
    trainer.fit(module, loader(), loader(16, seed=1))
    return trainer, module, monitor, root / "version_0"


def test_epoch_figures_equal_independent_counts(fitted):
    trainer, module, monitor, run = fitted
    records = {(r["epoch"], r["slot"]): r for r in load_sparsity_summary(run)["records"]}
    assert set(records) == {(e, s) for e in (0, 1) for s in SLOT_NAMES}
    for (epoch, slot), rec in records.items():
        tr = module.counts[("train", epoch, slot)]
        va = module.counts[("val", epoch, slot)]
        assert rec["seen"] == tr["seen"] == 4 * 8 * CHANNELS[slot] * (64 if slot != "head" else 1)
        assert rec["dropped"] == tr["dropped"]
        assert rec["dropped"] > 0, slot  # the tiny model does shut units off
        assert rec["dropped_fraction"] == pytest.approx(tr["dropped"] / tr["seen"])
        assert rec["train_zero_in"] == pytest.approx(tr["zero_in"] / tr["numel"])
        assert rec["train_zero_out"] == pytest.approx(tr["zero_out"] / tr["numel"])
        assert rec["val_zero_in"] == pytest.approx(va["zero_in"] / va["numel"])  # sanity-check batches excluded
        assert rec["val_zero_out"] == rec["val_zero_in"]  # every dropout layer is the identity in eval
        # The last epoch's values are what was logged and what callbacks can monitor.
        if epoch == 1:
            for key in ("dropped", "seen", "dropped_fraction", "train_zero_in", "val_zero_out"):
                assert monitor.logged[f"maxdrop/{slot}/{key}"] == pytest.approx(rec[key])
                assert float(trainer.callback_metrics[f"maxdrop/{slot}/{key}"]) == pytest.approx(rec[key], rel=1e-6)


def test_hooks_are_removed_after_fit(fitted):
    _, module, _, _ = fitted
    for layer in module.backbone.dropout_slots().values():
        assert not layer._forward_pre_hooks  # only the test's own recording hook is left
        assert len(layer._forward_hooks) == 1


def test_tensorboard_event_files_hold_the_tags(fitted):
    _, module, monitor, run = fitted
    acc = read_events(run)
    scalars = set(acc.Tags()["scalars"])
    per_slot = ("dropped", "seen", "dropped_fraction", "train_zero_in", "train_zero_out", "val_zero_in", "val_zero_out")
    expected = {f"maxdrop/{s}/{k}" for s in SLOT_NAMES for k in per_slot}
    expected |= {f"maxdrop_step/{s}/{k}" for s in SLOT_NAMES for k in ("dropped_fraction", "zero_in", "zero_out")}
    assert expected <= scalars
    assert {t for t in scalars if t.startswith("maxdrop")} == set(monitor.logged)
    # One value per epoch, at Lightning's epoch-end step, equal to what was logged.
    events = acc.Scalars("maxdrop/stage1/dropped_fraction")
    assert len(events) == 2
    assert events[-1].value == pytest.approx(monitor.logged["maxdrop/stage1/dropped_fraction"], rel=1e-6)
    epoch_at = {e.step: e.value for e in acc.Scalars("epoch")}
    assert [epoch_at[e.step] for e in events] == [0, 1]
    # Step-level values every 2 of the 4 batches of each epoch.
    assert len(acc.Scalars("maxdrop_step/stage2/zero_out")) == 4
    # Per-channel histograms from the last epoch: one entry per channel, equal to independent counts.
    hist_tags = set(acc.Tags()["histograms"])
    for slot in SLOT_NAMES:
        assert {f"maxdrop/{slot}/channel_drop_rate", f"maxdrop/{slot}/channel_magnitude"} <= hist_tags
        h = acc.Histograms(f"maxdrop/{slot}/channel_drop_rate")[-1].histogram_value
        assert h.num == CHANNELS[slot]
        per_channel_numel = 4 * 8 * (64 if slot != "head" else 1)
        rates = module.per_channel[(1, slot)].double() / per_channel_numel
        assert h.sum == pytest.approx(float(rates.sum()), rel=1e-5)
        assert h.max == pytest.approx(float(rates.max()), rel=1e-5)


def test_summary_file_format(fitted):
    _, _, _, run = fitted
    path = run / "sparsity.json"
    data = json.loads(path.read_text())
    assert data["format"] == SUMMARY_FORMAT and data["world_size"] == 1
    assert data["slots"]["stage1"] == {
        "class": "maxdrop.layers.max_dropout.MaxDropout",
        "repr": "MaxDropout(p=0.5, scope='tensor')",
        "dropped_counted_by": "layer",
    }
    assert data["slots"]["head"]["dropped_counted_by"] == "hooks"
    # Records in epoch order, slots in the backbone's order; every field present.
    assert [(r["epoch"], r["slot"]) for r in data["records"]] == [(e, s) for e in (0, 1) for s in SLOT_NAMES]
    assert all(set(r) == {"epoch", "step", "slot", *data["records"][0]} for r in data["records"])
    assert isinstance(data["records"][0]["dropped"], int)  # exact counts, not float32 as in TensorBoard
    assert not list(run.glob(".sparsity.json.*"))  # no temporary file left behind
    assert load_sparsity_summary(path) == data


def test_load_sparsity_summary_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sparsity summary"):
        load_sparsity_summary(tmp_path)
    bad = tmp_path / "sparsity.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="maxdrop-sparsity/1.*something-else"):
        load_sparsity_summary(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sparsity_summary(bad)


def test_resume_keeps_the_records_of_earlier_epochs(tmp_path):
    torch.manual_seed(0)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, SparsityMonitor(histograms=False), epochs=1, limit_train_batches=2)
    trainer.callbacks.append(ckpt)
    trainer.fit(TinyModule(record=False), loader(), loader(16))
    first = load_sparsity_summary(tmp_path / "version_0")["records"]
    trainer = make_trainer(tmp_path, SparsityMonitor(histograms=False), epochs=2, limit_train_batches=2)
    trainer.callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True))
    trainer.fit(TinyModule(record=False), loader(), loader(16), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    records = load_sparsity_summary(tmp_path / "version_0")["records"]
    assert [r["epoch"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert records[:3] == first


def test_no_dropout_slots_warns_and_logs_nothing(tmp_path):
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(x.flatten(1))

    monitor = SparsityMonitor()
    trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=2)
    with pytest.warns(UserWarning, match="no backbone with a dropout_slots"):
        trainer.fit(TinyModule(Plain()), loader(), loader(16))
    assert monitor.logged == {}
    assert not any(k.startswith("maxdrop") for k in trainer.callback_metrics)
    assert not (tmp_path / "version_0" / "sparsity.json").exists()


def test_backbone_with_empty_slots_is_quiet(tmp_path):
    """A baseline config (no slot filled) lists the monitor too: no warning, nothing logged."""
    monitor = SparsityMonitor()
    trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SparsityMonitor.*")
        trainer.fit(TinyModule(TinyBackbone(slots={})), loader(), loader(16))
    assert monitor.logged == {}


def test_slots_found_on_any_submodule_when_there_is_no_backbone_attribute():
    class Wrapper(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(TinyBackbone())

    found = find_dropout_slots(Wrapper())
    assert list(found) == list(SLOT_NAMES)
    assert isinstance(found["stage1"], MaxDropout)

    class Two(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = TinyBackbone(), TinyBackbone(slots={"head": nn.Dropout(0.1)})

    assert list(find_dropout_slots(Two())) == ["a.stage1", "a.stage2", "a.head", "b.head"]
    assert find_dropout_slots(nn.Linear(2, 2)) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"log_every_n_batches": -1}, "log_every_n_batches must be an int >= 0.*-1"),
        ({"log_every_n_batches": 2.5}, "log_every_n_batches must be an int >= 0.*2.5"),
        ({"summary_file": ""}, "summary_file must be a non-empty path or None"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityMonitor(**kwargs)


def test_bad_dropout_slots_are_named():
    class ListSlots(nn.Module):
        def dropout_slots(self):
            return [nn.Dropout()]

    class Shared(nn.Module):
        def dropout_slots(self):
            d = nn.Dropout()
            return {"block.0": d, "block.1": d}

    class NotAModule(nn.Module):
        def dropout_slots(self):
            return {"stage1": 0.3}

    def holder(backbone):
        m = nn.Module()
        m.backbone = backbone
        return m

    with pytest.raises(TypeError, match="must return a dict.*got list"):
        find_dropout_slots(holder(ListSlots()))
    with pytest.raises(ValueError, match="'block.0' and 'block.1' hold the same Dropout instance"):
        find_dropout_slots(holder(Shared()))
    with pytest.raises(TypeError, match="must map str to nn.Module, got 'stage1': float"):
        find_dropout_slots(holder(NotAModule()))


@contextmanager
def no_host_sync():
    """Makes every Tensor -> Python conversion (a host-device sync on a GPU) raise."""
    names = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"host-device sync: Tensor.{name}")

        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_training_forward_makes_no_host_device_sync(tmp_path):
    class Guarded(TinyModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            with no_host_sync():
                logits = self.backbone(x)
            return nn.functional.cross_entropy(logits, y)

    monitor = SparsityMonitor(summary_file=None)
    trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(Guarded(record=False), loader())
    assert monitor.logged["maxdrop/stage1/seen"] == 2 * 8 * 4 * 64  # the hooks did run


def test_compiled_backbone_gives_the_eager_figures(tmp_path):
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        backbone = TinyBackbone()
        if compiled:
            backbone = torch.compile(backbone, backend="aot_eager")
        monitor = SparsityMonitor(summary_file=None)
        trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False)
        trainer.fit(TinyModule(backbone, record=False), loader(), loader(16))
        results.append(monitor.logged)
    assert set(results[0]) == set(results[1])
    assert results[1] == pytest.approx(results[0])


def test_configurable_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: maxdrop.callbacks.SparsityMonitor\n"
        "      init_args:\n"
        "        log_every_n_batches: 50\n"
        "        histograms: false\n"
        "        summary_file: sparsity/epochs.json\n"
    )
    cli = LightningCLI(TinyModule, run=False, args=["--config", str(config)], save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityMonitor)]
    assert (monitor.log_every_n_batches, monitor.histograms, monitor.validation) == (50, False, True)
    assert monitor.summary_file == "sparsity/epochs.json"
    # Defaults alone are a valid entry too: what every shipped config lists.
    args = ["--trainer.callbacks+=maxdrop.callbacks.SparsityMonitor"]
    cli = LightningCLI(TinyModule, run=False, args=args, save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityMonitor)]
    assert (monitor.histograms, monitor.log_every_n_batches, monitor.summary_file) == (True, 0, "sparsity.json")
    # The command-line form docs/monitoring.md shows for setting one of its arguments.
    args += ["--trainer.callbacks.log_every_n_batches=50"]
    cli = LightningCLI(TinyModule, run=False, args=args, save_config_callback=None)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, SparsityMonitor)]
    assert monitor.log_every_n_batches == 50


class FlexBackbone(nn.Module):
    """One slot whose input alternates between 4 and 2 channels from batch to batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.flex = nn.Dropout(0.5)
        self.fc = nn.Linear(1, 10)
        self.calls = 0

    def dropout_slots(self) -> dict[str, nn.Module]:
        return {"flex": self.flex}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).relu()
        if self.training:
            self.calls += 1
            h = h[:, :2] if self.calls % 2 else h
        return self.fc(self.flex(h).mean((1, 2, 3))[:, None])


def test_a_slot_whose_channel_count_changes_keeps_exact_totals_and_drops_its_histograms(tmp_path):
    monitor = SparsityMonitor()
    module = TinyModule(FlexBackbone())
    trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, loader(), loader(16))
    counts = module.counts[("train", 0, "flex")]
    assert monitor.logged["maxdrop/flex/seen"] == counts["seen"] == 8 * 64 * (2 + 4 + 2)
    assert monitor.logged["maxdrop/flex/dropped"] == counts["dropped"]
    assert monitor.logged["maxdrop/flex/train_zero_out"] == pytest.approx(counts["zero_out"] / counts["numel"])
    assert not [t for t in read_events(tmp_path / "version_0").Tags()["histograms"] if "flex" in t]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(300, 16, 8, 8).relu(), id="3 row blocks, the last one partial"),
        pytest.param(lambda: torch.randn(64, 16, 8, 8).relu().to(memory_format=torch.channels_last), id="NHWC"),
        pytest.param(lambda: torch.randn(64, 16, 8, 8).relu().bfloat16(), id="bfloat16"),
        pytest.param(lambda: torch.randn(40, 7).relu(), id="(N, F)"),
        pytest.param(lambda: torch.randn(40).relu(), id="(N,)"),
        pytest.param(lambda: torch.tensor(0.0), id="0-dim"),
    ],
)
@pytest.mark.parametrize("exact_limit", [2**24, 16], ids=["buffer path", "count_nonzero path"])
def test_per_channel_counts_are_exact_for_any_layout(make, exact_limit, monkeypatch):
    import maxdrop.monitoring.sparsity as sparsity

    monkeypatch.setattr(sparsity, "_EXACT_COUNT", exact_limit)
    x = make()
    nz, mag = SparsityMonitor()._channel_stats(x, magnitude=True)
    v = x.reshape(x.shape[0] if x.ndim else 1, x.shape[1] if x.ndim > 1 else 1, -1).float()
    assert nz.dtype == torch.int64
    assert torch.equal(nz, (v != 0).sum((0, 2)))
    assert torch.allclose(mag, v.abs().sum((0, 2)), rtol=1e-5)


@pytest.mark.parametrize(
    "backbone",
    [
        pytest.param(
            partial(
                FastCNN,
                widths=(4, 8, 8),
                slots={"stage1": partial(MaxDropout, 0.3), "block": partial(nn.Dropout2d, 0.2), "head": nn.Dropout},
            ),
            id="FastCNN",
        ),
        pytest.param(
            partial(
                ResNet18, width=4, slots={"stage2": partial(MaxDropoutV2, 0.3), "block": partial(DropBlock2d, 0.2, 3)}
            ),
            id="ResNet18",
        ),
        pytest.param(
            partial(WideResNet, depth=10, widen_factor=1, slots={"block": partial(MaxDropout, 0.3)}), id="WRN-10-1"
        ),
    ],
)
def test_real_backbones_every_slot_matches_independent_counts(tmp_path, backbone):
    torch.manual_seed(0)
    module = RecordedClassifier(backbone=backbone, lr_scheduler=None)
    monitor = SparsityMonitor()
    trainer = make_trainer(tmp_path, monitor, epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, images(8, 0), images(4, 1))
    summary = load_sparsity_summary(tmp_path / "version_0")
    assert list(summary["slots"]) == list(module.backbone.dropout_slots())  # full names, forward order
    # A slot with several positions (WRN's block.0 ... block.2) is also reported as its total.
    totals, expected = summary["totals"], {}
    for name in summary["slots"]:
        if re.fullmatch(r"block\.\d+", name):
            expected.setdefault("block", []).append(name)
    assert totals == expected and (expected or "block" not in str(list(summary["slots"])))
    assert {r["slot"] for r in summary["records"]} == {*summary["slots"], *totals}

    def counted(phase: str, slot: str) -> dict[str, int]:
        parts = [module.counts[(phase, 0, s)] for s in totals.get(slot, [slot])]
        return {k: sum(c[k] for c in parts) for k in parts[0]}

    for rec in summary["records"]:
        tr, va = counted("train", rec["slot"]), counted("val", rec["slot"])
        assert (rec["dropped"], rec["seen"]) == (tr["dropped"], tr["seen"]), rec["slot"]
        assert rec["train_zero_out"] == pytest.approx(tr["zero_out"] / tr["numel"])
        assert rec["val_zero_in"] == pytest.approx(va["zero_in"] / va["numel"])
    histograms = set(read_events(tmp_path / "version_0").Tags()["histograms"])
    assert {f"maxdrop/{s}/channel_drop_rate" for s in summary["slots"]} <= histograms
