"""DropMaskImages: the maps, one image per slot for every kind of slot layer, no effect on training."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from maxdrop import MaxDropout, MaxDropoutV2
from maxdrop.callbacks import DropMaskImages
from maxdrop.cli import MaxdropCLI
from maxdrop.data import CIFARDataModule, RawBatch
from maxdrop.models import FastCNN
from maxdrop.module import ClassificationModule
from maxdrop.monitoring.drop_masks import TAG, drop_map, input_map
from tests.helpers.data import tiny_run_config
from tests.helpers.monitoring import images_of
from tests.helpers.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [ROOT / "configs" / "quickstart.yaml", *sorted((ROOT / "configs" / "study").glob("*.yaml"))]
EVERY_KIND = {
    "maxdrop_torch": {
        "stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3, "scope": "sample"}},
        "stage2": {"class_path": "maxdrop.MaxDropoutV2", "init_args": {"p": 0.3}},
        "block": {"class_path": "torchvision.ops.DropBlock2d", "init_args": {"p": 0.3, "block_size": 3}},
        "head": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.5}},
    },
    "top_k_and_targets": {
        "stage1": {"class_path": "maxdrop.TopKDropout", "init_args": {"rate": 0.1}},
        "stage2": {"class_path": "maxdrop.TopDropBlock", "init_args": {"h_ratio": 0.33}},
        "block": {"class_path": "torch.nn.Dropout2d", "init_args": {"p": 0.2}},
        "head": {"class_path": "maxdrop.ProbGuidedMaxout"},  # needs the images' labels
    },
}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when it gets args while sys.argv holds pytest's own."""
    monkeypatch.setattr(sys, "argv", ["maxdrop"])


def fit(tmp_path: Path, data_dir: Path, name: str, slots: dict, callbacks: list[dict], **trainer) -> Path:
    """``maxdrop fit`` of the tiny config in-process; returns the run folder."""
    cfg = yaml.safe_load(tiny_run_config(str(data_dir), slots=slots, trainer={"max_epochs": 2, **trainer}))
    cfg["seed_everything"] = 0
    cfg["trainer"]["callbacks"] += callbacks
    cfg["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(tmp_path), "name": name, "version": 0},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    MaxdropCLI(args=["fit", "--config", str(path)])
    return tmp_path / name / "version_0"


# ---------------------------------------------------------------- the maps


def test_drop_map_is_the_dropped_share_of_the_active_channels_at_each_position():
    x = torch.zeros(1, 4, 2, 2)
    x[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # 4 active channels, 3 dropped
    x[0, :2, 0, 1] = 5.0  # 2 active, none dropped
    x[0, 0, 1, 0] = 6.0  # 1 active, dropped; (1, 1): nothing active
    y = x.clone()
    y[0, 1:, 0, 0] = 0.0
    y[0, 0, 1, 0] = 0.0
    y[0, 3, 1, 1] = 0.0  # was already zero: not a drop
    assert drop_map(x, y).tolist() == [[[0.75, 0.0], [1.0, 0.0]]]
    assert input_map(x).tolist() == [[[2.5, 2.5], [1.5, 0.0]]]


def test_maxdropout_v2_drops_whole_positions_and_dropout_about_p_everywhere():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(4, 16, 8, 8)) + 0.01  # every unit active
    v2 = MaxDropoutV2(0.3).train()
    d = drop_map(x, v2(x))
    summed = x.sum(1)
    lo, hi = summed.amin((1, 2), keepdim=True), summed.amax((1, 2), keepdim=True)
    assert torch.equal(d, ((summed - lo) / (hi - lo) > 0.7).float())  # exactly 1 where V2 drops, 0 elsewhere
    d = drop_map(x, nn.Dropout(0.5).train()(x))
    assert 0.4 < d.mean() < 0.6 and 0 < d.min() and d.max() < 1


def test_flat_head_inputs_become_a_padded_grid_of_features():
    x = torch.arange(1.0, 11.0).repeat(2, 1)  # (N, D) = (2, 10): a 4x3 grid, last 2 cells padding
    y = x.clone()
    y[:, 9] = 0
    m, d = input_map(x), drop_map(x, y)
    assert m.shape == d.shape == (2, 3, 4)
    assert m[0].flatten()[:10].tolist() == x[0].tolist() and m[0].flatten()[10:].isnan().all()
    assert d[0].flatten()[9] == 1 and d[0].flatten()[:9].sum() == 0 and d[0].flatten()[10:].isnan().all()
    assert input_map(torch.ones(5)) is None and drop_map(x, y[:, :5]) is None


@pytest.mark.parametrize(
    "kwargs", [{"every_n_epochs": -1}, {"num_images": 0}, {"cell": 4}, {"seed": -1}, {"every_n_epochs": 1.5}]
)
def test_bad_arguments_are_refused_with_the_value(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(ValueError, match=rf"{name} must be an int >= \d+, got {value!r}"):
        DropMaskImages(**kwargs)


# ---------------------------------------------------------------- the images


@pytest.mark.slow
@pytest.mark.parametrize("kinds", list(EVERY_KIND))
def test_one_image_per_slot_for_every_kind_of_slot_layer(kinds, tmp_path, tiny_tree):
    """maxdrop's layers, torch's and torchvision's, ProbGuidedMaxout (which needs the labels) at the head:
    one labelled grid per slot and write, and nothing turned off."""
    cb = {"class_path": "maxdrop.callbacks.DropMaskImages", "init_args": {"every_n_epochs": 1, "num_images": 4}}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*DropMaskImages.*")
        run = fit(tmp_path, tiny_tree, "kinds", EVERY_KIND[kinds], [cb], max_epochs=3, limit_train_batches=2)
    images = images_of(run)
    assert set(images) == {f"{TAG}/{s}" for s in ("block.0", "stage1", "block.1", "stage2", "head")}
    for tag, written in images.items():
        assert [step for step, _, _ in written] == [2, 4, 6]  # after each epoch; the end of fit is epoch 3's
        png = Image.open(io.BytesIO(written[-1][1]))
        assert png.size[0] > 4 * 64 and png.size[1] > 3 * 64  # 4 columns, 3 rows of 64-pixel cells
        desc = written[-1][2]
        assert "Row 3 (dropped)" in desc and "black = none, red = a few, yellow = all" in desc
        assert ("each cell is one of its 8 features" in desc) == (tag == f"{TAG}/head")


def _dropped_row(png: bytes, k: int, cell: int = 64) -> np.ndarray:
    """The 'dropped' row of a grid as (k, cell, cell, 3) RGB (see compose_grid's layout)."""
    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    margin, gap, top = 64, 2, 2 + 2 * (cell + 2)
    return np.stack([a[top : top + cell, margin + gap + i * (cell + gap) :][:, :cell] for i in range(k)])


@pytest.mark.slow
def test_the_dropped_row_shows_what_the_layer_drops_on_those_images(tmp_path, tiny_tree):
    """A deterministic slot (MaxDropoutV2 right after the stem's block) against its own mask."""
    slots = {"stage1": {"class_path": "maxdrop.MaxDropoutV2", "init_args": {"p": 0.3}}}
    cb = DropMaskImages(every_n_epochs=1, num_images=3)
    cb_cfg = {"class_path": "maxdrop.callbacks.DropMaskImages", "init_args": {"every_n_epochs": 0, "num_images": 3}}
    run = fit(tmp_path, tiny_tree, "v2", slots, [cb_cfg], max_epochs=1, limit_train_batches=1)
    ((_, png, _),) = images_of(run)[f"{TAG}/stage1"]
    shown = _dropped_row(png, 3)
    # The same forward by hand: the last checkpoint's backbone in eval mode, the slot in training mode.
    ckpt = run / "checkpoints" / "last.ckpt"
    module = ClassificationModule.load_from_checkpoint(ckpt, map_location="cpu").eval()
    seen = {}
    layer = module.backbone.dropout_slots()["stage1"].train()
    layer.register_forward_hook(lambda m, a, y: seen.update(x=a[0].clone(), y=y))
    dm = CIFARDataModule(data_dir=str(tiny_tree), val_size=10, cache=False)
    images, labels = dm.split("val")
    idx = cb._pick(len(labels))
    x, _ = dm.transform_batch(RawBatch(images[idx], labels[idx], None))
    with torch.no_grad():
        module.backbone(x)
    expected = drop_map(seen["x"], seen["y"]).numpy()  # (3, 16, 16): 4x4-pixel cells in the picture
    assert expected.max() == 1 and expected.min() == 0
    yellow, black = np.array([255, 255, 0]), np.array([0, 0, 0])  # all active channels dropped / none
    np.testing.assert_array_equal(shown[:, ::4, ::4], np.where(expected[..., None] == 1, yellow, black))


# ---------------------------------------------------------------- no effect on training


def _state(run: Path) -> tuple[dict, dict, list]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"], ckpt["optimizer_states"], json.loads((run / "sparsity.json").read_text())


@pytest.mark.slow
def test_training_ends_bitwise_equal_with_the_images_on_or_off(tmp_path, tiny_tree):
    """Weights, BatchNorm statistics, optimizer state, RNG states (saved in the checkpoint) and the
    monitor's summary are identical; random slots (Dropout, DropBlock) would show any RNG draw taken."""
    slots = {
        "stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}},
        "stage2": {"class_path": "torch.nn.Dropout2d", "init_args": {"p": 0.2}},
        "block": {"class_path": "torchvision.ops.DropBlock2d", "init_args": {"p": 0.2, "block_size": 3}},
        "head": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.3}},
    }
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    on = {"class_path": "maxdrop.callbacks.DropMaskImages", "init_args": {"every_n_epochs": 1}}
    off = {"class_path": "maxdrop.callbacks.DropMaskImages", "init_args": {"enabled": False}}
    run_on = fit(tmp_path, tiny_tree, "on", slots, [on, ckpt], limit_train_batches=3)
    run_off = fit(tmp_path, tiny_tree, "off", slots, [off, ckpt], limit_train_batches=3)
    assert len(images_of(run_on)) == 5 and images_of(run_off) == {}
    (w_on, opt_on, sp_on), (w_off, opt_off, sp_off) = _state(run_on), _state(run_off)
    assert w_on.keys() == w_off.keys()
    for k in w_on:
        assert torch.equal(w_on[k], w_off[k]), k  # includes BatchNorm running stats and batch counts
    assert str(opt_on) == str(opt_off)
    assert sp_on == sp_off
    rng_on = torch.load(run_on / "checkpoints" / "last.ckpt", weights_only=False)["maxdrop_rng_states"]
    rng_off = torch.load(run_off / "checkpoints" / "last.ckpt", weights_only=False)["maxdrop_rng_states"]
    assert torch.equal(rng_on["torch"], rng_off["torch"]) and rng_on["python"] == rng_off["python"]
    assert torch.equal(rng_on["numpy"][1], rng_off["numpy"][1]) and rng_on["numpy"][2] == rng_off["numpy"][2]


def test_a_write_leaves_the_model_counters_modes_and_generators_alone(tmp_path):
    """Called directly: MaxDropout counters, train/eval flags, BatchNorm buffers, every RNG, other hooks."""
    torch.manual_seed(0)
    module = ClassificationModule(
        backbone=lambda n: FastCNN(n, widths=(4, 8), slots={"stage1": lambda: MaxDropout(0.3, scope="global")}),
        lr_scheduler=None,
    ).train()
    layer = module.backbone.dropout_slots()["stage1"]
    layer(torch.randn(2, 8, 4, 4))  # counters hold a value
    calls = []
    layer.register_forward_hook(lambda *a: calls.append(1))
    data = DataLoader(TensorDataset(torch.randn(20, 3, 32, 32), torch.zeros(20, dtype=torch.long)), batch_size=10)
    logger = TensorBoardLogger(tmp_path, name="")
    trainer = SimpleNamespace(
        is_global_zero=True, loggers=[logger], global_step=7, datamodule=None, val_dataloaders=data
    )
    before = {
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "counters": (layer.last_dropped, layer.dropped_total.clone(), layer.seen_total.clone(), layer.last_seen),
        "modes": [m.training for m in module.modules()],
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
    }
    cb = DropMaskImages(num_images=4)
    cb.write(trainer, module)
    assert cb._off_reason is None and cb.skipped == {} and layer.scope == "global"
    assert all(torch.equal(v, before["state"][k]) for k, v in module.state_dict().items())
    assert layer.last_dropped is before["counters"][0] and layer.last_seen == before["counters"][3]
    assert torch.equal(layer.dropped_total, before["counters"][1])
    assert torch.equal(layer.seen_total, before["counters"][2])
    assert [m.training for m in module.modules()] == before["modes"] and calls == []
    assert torch.equal(torch.get_rng_state(), before["rng"][0])
    assert (np.random.get_state()[1] == before["rng"][1]).all() and random.getstate() == before["rng"][2]
    assert [step for step, _, _ in images_of(Path(logger.log_dir))[f"{TAG}/stage1"]] == [7]


# ---------------------------------------------------------------- configs and DDP


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.stem)
def test_on_in_the_shipped_configs_and_off_with_one_switch(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(config), "--data.data_dir", str(tmp_path)]
    (cb,) = [c for c in MaxdropCLI(args=args, run=False).trainer.callbacks if isinstance(c, DropMaskImages)]
    assert cb.enabled and cb.every_n_epochs == 1
    cli = MaxdropCLI(args=[*args, "--trainer.callbacks.enabled=false"], run=False)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, DropMaskImages)]
    assert not cb.enabled


@pytest.mark.slow
def test_ddp_writes_on_rank_0_only_without_collectives(tmp_path, tiny_tree):
    """2 gloo processes and a scope="global" MaxDropout (an all-reduce in each training forward): the
    images forward on rank 0 alone must neither hang nor fail. (SyncBatchNorm needs GPUs; in eval mode,
    as in the images forward, it does not communicate.)"""
    slots = {"stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3, "scope": "global"}}}
    cfg = yaml.safe_load(tiny_run_config(str(tiny_tree), slots=slots, trainer={"limit_train_batches": 2}))
    cfg["trainer"].update(strategy="ddp", devices=2)
    cfg["trainer"]["callbacks"].append(
        {"class_path": "maxdrop.callbacks.DropMaskImages", "init_args": {"every_n_epochs": 1}}
    )
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "maxdrop", "fit", "--config", "ddp.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DropMaskImages" not in proc.stderr  # no warning: nothing turned off
    (run,) = (tmp_path / "lightning_logs").iterdir()
    assert [step for step, _, _ in images_of(run)[f"{TAG}/stage1"]] == [2, 4]
