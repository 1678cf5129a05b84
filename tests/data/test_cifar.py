"""CIFARDataModule: the train/validation split and subsets, Lightning integration, DDP shards, the real data
(sources: test_sources.py, cache: test_cache.py, augmentation: test_augment.py, tensor loader: test_loaders.py)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from maxdrop.data import CIFARDataModule
from tests.helpers.data import (
    CIFAR10_CLASSES,
    write_official_dir,
)
from tests.helpers.datamodule import dm_for, fake_trainer, quiet_trainer

# --------------------------------------------------------------------------- split


def test_split_is_seeded_disjoint_and_complete(tmp_path):
    folder = write_official_dir(tmp_path, n_train=100, n_test=20)
    a = dm_for(folder, tmp_path, val_size=30, split_seed=3)
    b = dm_for(folder, tmp_path, val_size=30, split_seed=3)
    c = dm_for(folder, tmp_path, val_size=30, split_seed=4)
    ids = {  # every test image is unique, so its bytes identify it
        name: {bytes(img.numpy()) for img in dm.split(split)[0]}
        for name, dm, split in (("a_val", a, "val"), ("a_train", a, "train"), ("b_val", b, "val"), ("c_val", c, "val"))
    }
    assert len(ids["a_val"]) == 30 and len(ids["a_train"]) == 70
    assert ids["a_val"].isdisjoint(ids["a_train"])
    assert ids["a_val"] == ids["b_val"] and ids["a_val"] != ids["c_val"]
    assert torch.equal(dm_for(folder, tmp_path, val_size=0).split("val")[0], a.split("test")[0])


def image_ids(images: torch.Tensor) -> set[bytes]:
    return {bytes(img.numpy()) for img in images}  # every synthetic image is unique


def test_train_per_class_is_a_stratified_fixed_subset_outside_the_val_split(tmp_path):
    folder = write_official_dir(tmp_path, n_train=400, n_test=20)
    a = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=5, seed=1)
    (tx, ty), (vx, _) = a.split("train"), a.split("val")
    assert torch.equal(torch.bincount(ty, minlength=10), torch.full((10,), 5))
    assert image_ids(tx).isdisjoint(image_ids(vx))
    full = dm_for(folder, tmp_path, val_size=50, split_seed=3)
    assert torch.equal(vx, full.split("val")[0])  # the validation split does not depend on the subset
    assert image_ids(tx) <= image_ids(full.split("train")[0])
    # The same images for every training seed (and rank, and resume: nothing else enters the draw) ...
    same = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=5, seed=2)
    assert torch.equal(same.split("train")[0], tx)
    # ... another subset_seed draws other images, and a smaller subset lies inside a larger one.
    other = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=5, subset_seed=1)
    assert image_ids(other.split("train")[0]) != image_ids(tx)
    larger = dm_for(folder, tmp_path, val_size=50, split_seed=3, train_per_class=12, seed=1)
    assert image_ids(tx) < image_ids(larger.split("train")[0])
    assert a.hparams.train_per_class == 5 and a.hparams.subset_seed == 0  # saved in the run's config


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_train_per_class_is_a_clear_error(tmp_path, bad):
    with pytest.raises(ValueError, match=rf"train_per_class must be null or an integer >= 1, got {bad!r}"):
        dm_for(tmp_path, tmp_path, train_per_class=bad)


def test_train_per_class_above_the_smallest_class_names_the_limit(tmp_path):
    folder = write_official_dir(tmp_path, n_train=200, n_test=20)
    after_val = dm_for(folder, tmp_path, val_size=40).split("train")[1]
    counts = torch.bincount(after_val, minlength=10)
    limit, smallest = int(counts.min()), CIFAR10_CLASSES[int(counts.argmin())]
    assert dm_for(folder, tmp_path, val_size=40, train_per_class=limit).split("train")[0].shape[0] == 10 * limit
    dm = dm_for(folder, tmp_path, val_size=40, train_per_class=limit + 1)
    with pytest.raises(
        ValueError,
        match=rf"train_per_class={limit + 1} is more than the {limit} training images of "
        rf"class '{smallest}' after the 40-image validation split .* use at most {limit}",
    ):
        dm.setup()


# --------------------------------------------------------------------------- Lightning


class TinyNet(pl.LightningModule):
    """Records what each step receives."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        self.seen: dict[str, list[tuple]] = {"train": [], "val": [], "test": [], "predict": []}

    def _record(self, stage, batch):
        x, y = batch
        self.seen[stage].append((x.dtype, tuple(x.shape), y.dtype, float(x.mean())))
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, i):
        return self._record("train", batch)

    def validation_step(self, batch, i):
        self._record("val", batch)

    def test_step(self, batch, i):
        self._record("test", batch)

    def predict_step(self, batch, i):
        self._record("predict", batch)
        return self.net(batch[0]).argmax(1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_trainer_fit_validate_test_predict(tmp_path, loader):
    folder = write_official_dir(tmp_path, n_train=60, n_test=20)
    dm = dm_for(folder, tmp_path, val_size=10, batch_size=16, loader=loader, augment={"cutout_holes": 1})
    model = TinyNet()
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    preds = trainer.predict(model, datamodule=dm)
    assert [s[1][0] for s in model.seen["train"]] == [16, 16, 16, 2] * 2
    assert sum(s[1][0] for s in model.seen["test"]) == 20 and sum(len(p) for p in preds) == 20
    for stage, records in model.seen.items():
        assert records, stage
        for x_dtype, shape, y_dtype, _ in records:
            assert x_dtype == torch.float32 and shape[1:] == (3, 32, 32) and y_dtype == torch.int64


def test_lightning_cli_builds_the_datamodule_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    folder = write_official_dir(tmp_path, "cifar100", n_train=10, n_test=10)

    class Linked(pl.LightningModule):
        def __init__(self, num_classes: int = 10) -> None:
            super().__init__()
            self.num_classes = num_classes

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "data:\n  class_path: maxdrop.data.CIFARDataModule\n  init_args:\n"
        f"    dataset: cifar100\n    data_dir: {folder}\n    cache_dir: {tmp_path / 'cache'}\n"
        "    augment: {cutout_holes: 1, cutout_length: 8, erasing_p: 0.25}\n"
    )
    cli = CLI(
        Linked,
        pl.LightningDataModule,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(cfg)],
        trainer_defaults={"logger": False},
        save_config_callback=None,
    )
    assert isinstance(cli.datamodule, CIFARDataModule) and cli.model.num_classes == 100
    assert cli.datamodule.augment.cutout_length == 8 and cli.datamodule.augment.erasing_p == 0.25
    assert cli.datamodule.augment.crop_padding == 4  # defaults kept for keys not given


# --------------------------------------------------------------------------- the real CIFAR-10


@pytest.mark.slow
def test_real_cifar10_jpeg_tarball(cifar10_jpeg, cifar10_cache):
    cache = cifar10_cache
    dm = CIFARDataModule(data_dir=str(cifar10_jpeg), cache_dir=str(cache), val_size=0)
    dm.prepare_data()
    dm.setup()
    (tx, ty), (sx, sy) = dm.split("train"), dm.split("test")
    assert tx.shape == (50000, 3, 32, 32) and sx.shape == (10000, 3, 32, 32)
    assert dm.classes == CIFAR10_CLASSES and dm.num_classes == 10
    assert torch.equal(torch.bincount(ty), torch.full((10,), 5000))
    assert torch.equal(torch.bincount(sy), torch.full((10,), 1000))
    assert len(set(sy[:100].tolist())) == 10  # a test batch holds all classes, as in the official files
    # The well-known CIFAR-10 statistics (JPEG shifts them only slightly).
    torch.testing.assert_close(dm.mean, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=0.005, rtol=0)
    torch.testing.assert_close(dm.std, torch.tensor([0.2470, 0.2435, 0.2616], dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.slow
def test_real_cifar10_small_data_subset(cifar10_jpeg, cifar10_cache):
    cache = cifar10_cache
    dm = CIFARDataModule(data_dir=str(cifar10_jpeg), cache_dir=str(cache), val_size=5000, train_per_class=100)
    (tx, ty), (vx, vy) = dm.split("train"), dm.split("val")
    assert tx.shape == (1000, 3, 32, 32) and torch.equal(torch.bincount(ty), torch.full((10,), 100))
    assert len(vy) == 5000 and image_ids(tx).isdisjoint(image_ids(vx))
    with pytest.raises(ValueError, match=r"train_per_class=4600 is more than the 4\d\d\d training images of class"):
        CIFARDataModule(data_dir=str(cifar10_jpeg), cache_dir=str(cache), val_size=5000, train_per_class=4600).setup()


class Recorder(TinyNet):
    """Records (epoch, batch_idx, checksum of the augmented images, labels) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, int, float, list[int]]] = []

    def training_step(self, batch, i):
        x, y = batch
        self.batches.append((self.current_epoch, i, float(x.double().sum()), y.tolist()))
        return nn.functional.cross_entropy(self.net(x), y)


def fit(tmp_path, folder, max_epochs, ckpt_path=None, callbacks=(), seed_offset=0):
    torch.manual_seed(1000 + seed_offset)  # different global RNG state per run: must not matter
    dm = dm_for(folder, tmp_path, val_size=10, batch_size=16, seed=7, augment={"cutout_holes": 1, "erasing_p": 0.5})
    model = Recorder()
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, callbacks=list(callbacks), num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model.batches


def test_resumed_training_sees_the_same_batches_as_a_straight_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = write_official_dir(tmp_path, n_train=74, n_test=10)  # 64 train images: 4 batches per epoch
    straight = fit(tmp_path, folder, 3)
    assert [b[:2] for b in straight] == [(e, i) for e in range(3) for i in range(4)]
    assert straight[0][2:] != straight[4][2:]  # epochs differ: the epoch is read from the trainer

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ep", save_last=True, every_n_epochs=1, save_top_k=-1)
    fit(tmp_path, folder, 1, callbacks=[ckpt], seed_offset=1)
    resumed = fit(tmp_path, folder, 3, ckpt_path=str(tmp_path / "ep" / "last.ckpt"), seed_offset=2)
    assert resumed == straight[4:]  # epochs 1 and 2, bit for bit

    mid = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=6, save_top_k=-1)
    fit(tmp_path, folder, 2, callbacks=[mid], seed_offset=3)
    (step6,) = (tmp_path / "mid").glob("*step=6.ckpt")  # saved after batch 1 of epoch 1
    resumed_mid = fit(tmp_path, folder, 3, ckpt_path=str(step6), seed_offset=4)
    assert resumed_mid == straight[6:]


class ShardRecorder(pl.LightningModule):
    """Writes the ids of every image each rank trained/validated/tested on (ids = first pixels, see data_helpers)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.lin = nn.Linear(1, 1)
        self.ids: dict[str, list[list[int]]] = {"train": [], "val": [], "test": []}

    def _ids(self, stage, batch):
        x = (batch[0] * 255).round().long()  # augment is off and normalize is off: the raw pixels
        self.ids[stage].append((x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist())

    def training_step(self, batch, i):
        self._ids("train", batch)
        return self.lin(batch[0][:, :1, 0, 0]).sum()

    def validation_step(self, batch, i):
        self._ids("val", batch)

    def test_step(self, batch, i):
        self._ids("test", batch)

    def on_train_end(self):  # ddp_spawn: each fit/test runs in fresh processes, so save after each
        torch.save(self.ids, f"{self.out_dir}/fit{self.global_rank}.pt")

    def on_test_end(self):
        torch.save(self.ids, f"{self.out_dir}/test{self.global_rank}.pt")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["tensor", "dataloader"])
def test_two_process_ddp_shards(tmp_path, loader):
    """Real DDP (2 gloo processes): disjoint train shards covering the split, each eval image exactly once."""
    folder = write_official_dir(tmp_path, n_train=70, n_test=23)  # 60 train, 10 val, 23 test (uneven)
    dm = dm_for(folder, tmp_path, val_size=10, batch_size=8, loader=loader, augment=AUG_OFF)
    dm.prepare_data()  # build the cache before spawning (prepare_data also runs inside, once)
    trainer = quiet_trainer(tmp_path, max_epochs=1, devices=2, strategy="ddp_spawn", num_sanity_val_steps=0)
    model = ShardRecorder(str(tmp_path))
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    ranks = [
        {**torch.load(tmp_path / f"fit{r}.pt"), "test": torch.load(tmp_path / f"test{r}.pt")["test"]} for r in (0, 1)
    ]
    dm.setup()

    def ids(split):
        x = dm.split(split)[0].long()
        return sorted((x[:, 0, 0, 0] + 256 * x[:, 1, 0, 0]).tolist())

    train = [sum(r["train"], []) for r in ranks]
    assert len(ranks[0]["train"]) == len(ranks[1]["train"]) == 4  # 30 per rank / 8
    assert set(train[0]).isdisjoint(train[1]) and sorted(train[0] + train[1]) == ids("train")
    for stage, split in (("val", "val"), ("test", "test")):
        assert sorted(sum(ranks[0][stage], []) + sum(ranks[1][stage], [])) == ids(split), stage


AUG_OFF = {"crop_padding": 0, "hflip": False, "normalize": False}


class OneDevicePerOp(torch.overrides.TorchFunctionMode):
    """Fails any torch op whose (non-scalar) tensor arguments lie on different devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        devices = {t.device.type for t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0}
        assert len(devices) <= 1, f"{func} mixes devices {devices}"
        return func(*args, **kwargs)


def test_data_on_device_gathers_and_augments_on_the_trainer_device(tmp_path):
    """No GPU here: the meta device stands in for it, and every op is checked to use one device."""
    folder = write_official_dir(tmp_path, n_train=40, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=16, augment={"cutout_holes": 2, "erasing_p": 1.0, "erasing_value": 1.5})
    dm.setup()
    dm.trainer = fake_trainer()
    dm.trainer.strategy.root_device = torch.device("meta")
    try:
        with OneDevicePerOp():
            for loader in (dm.train_dataloader(), dm.test_dataloader()):
                batch = next(iter(loader))
                assert batch.images.device.type == "meta" and batch.images.dtype == torch.uint8
                x, y = dm.transform_batch(batch)
                assert x.device.type == "meta" and x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
                assert y.device.type == "meta"
    finally:
        dm.trainer = None


def test_download_fetches_both_official_splits_into_data_dir(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeCIFAR100:  # stands in for the network: writes what torchvision's download leaves behind
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            write_official_dir(Path(root), "cifar100", n_train=10, n_test=10)

    monkeypatch.setattr(tvd, "CIFAR100", FakeCIFAR100)
    dm = dm_for(tmp_path / "dl", tmp_path, dataset="cifar100", download=True)
    dm.prepare_data()
    dm.setup()
    assert calls == [(str(tmp_path / "dl"), True, True), (str(tmp_path / "dl"), False, True)]
    assert dm.split("train")[0].shape == (10, 3, 32, 32)


def test_cache_off_and_unwritable_cache_still_load(tmp_path, caplog):
    folder = write_official_dir(tmp_path, n_train=20, n_test=10)
    off = CIFARDataModule(data_dir=str(folder), val_size=0, cache=False, cache_dir=str(tmp_path / "c"))
    assert off.split("train")[0].shape == (20, 3, 32, 32) and not (tmp_path / "c").exists()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING"):
        dm = CIFARDataModule(data_dir=str(folder), val_size=0, cache_dir=str(blocker / "cache"))
        assert torch.equal(dm.split("train")[0], off.split("train")[0])
    assert "could not write the data cache" in caplog.text


def test_drop_last_and_eval_batch_size(tmp_path):
    folder = write_official_dir(tmp_path, n_train=50, n_test=20)
    dm = dm_for(folder, tmp_path, batch_size=16, eval_batch_size=7, drop_last=True)
    assert [len(b.labels) for b in dm.train_dataloader()] == [16, 16, 16]
    assert len(dm.train_dataloader()) == 3
    assert [len(b.labels) for b in dm.test_dataloader()] == [7, 7, 6]


@pytest.mark.parametrize("world,expected", [(1, 128), (2, 64), (4, 32), (8, 16)])
def test_global_batch_size_is_divided_over_the_world(tmp_path, world, expected):
    folder = write_official_dir(tmp_path, n_train=300, n_test=20)
    dm = dm_for(folder, tmp_path, global_batch_size=128, batch_size=7)
    dm.trainer = fake_trainer(0, world)
    loader = dm.train_dataloader()
    assert dm.per_device_batch_size() == expected
    assert len(next(iter(loader)).labels) == expected


def test_global_batch_size_that_does_not_divide_is_a_clear_error(tmp_path):
    folder = write_official_dir(tmp_path, n_train=300, n_test=20)
    dm = dm_for(folder, tmp_path, global_batch_size=128)
    dm.trainer = fake_trainer(0, 3)
    with pytest.raises(ValueError, match=r"global_batch_size=128 does not divide over the world size 3"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"global_batch_size must be null or an integer >= 1, got 0"):
        dm_for(folder, tmp_path, global_batch_size=0)
