"""DivergenceGuard stops a diverged fit before any checkpoint holds its weights, and looks at the loss on the
host only every N steps (no device sync on the per-step path)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from maxdrop.callbacks import DivergenceGuard, TrainingDiverged

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class NaNFromStep(pl.LightningModule):
    """A linear model whose loss is NaN from training step ``bad_step`` (1-based) on."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.layer, self.bad_step, self.steps = nn.Linear(4, 1), bad_step, 0

    def training_step(self, batch, batch_idx):
        self.steps += 1
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.steps >= self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class CountsHostReads(DivergenceGuard):
    """The guard, counting the Tensor -> Python conversions (host-device syncs on a GPU) of each step's hook."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.reads_per_step: list[int] = []

    def on_train_batch_end(self, *args) -> None:
        count = [0]
        saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def counting(name):
            def read(tensor, *a, **k):
                count[0] += 1
                return saved[name](tensor, *a, **k)

            return read

        try:
            for name in HOST_READS:
                setattr(torch.Tensor, name, counting(name))
            super().on_train_batch_end(*args)
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
            self.reads_per_step.append(count[0])


def _fit(tmp_path, model, guard, epochs=3):
    data = torch.utils.data.TensorDataset(torch.randn(16, 4))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_epochs=1)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[guard, checkpoint], log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    return trainer


def test_divergence_stops_before_a_checkpoint_with_the_check_off_the_per_step_path(tmp_path):
    guard = CountsHostReads(check_every_n_steps=100)  # longer than the run: only epoch ends and saves look
    with pytest.raises(TrainingDiverged) as err:
        _fit(tmp_path, NaNFromStep(bad_step=6), guard)  # 4 steps per epoch: NaN from epoch 1, batch 1
    message = str(err.value)
    assert "training diverged at step 6 (epoch 1, batch 1): the loss is nan" in message
    assert "the last finite loss was" in message and "at step 5" in message
    assert f"the last good checkpoint is {tmp_path / 'ckpt' / 'last.ckpt'}" in message
    assert "checked every 100 steps" in message
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # Every step's hook ran without reading a tensor on the host (the looks happen in other hooks).
    assert len(guard.reads_per_step) == 8 and set(guard.reads_per_step) == {0}


def test_every_n_steps_the_guard_looks_once(tmp_path):
    guard = CountsHostReads(check_every_n_steps=3)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 2 \(epoch 0, batch 1\).*stopped at step 3"):
        _fit(tmp_path, NaNFromStep(bad_step=2), guard)
    assert guard.reads_per_step == [0, 0, 1]  # one host read (tolist) at the third step
    assert not (tmp_path / "ckpt").exists()


def test_switched_off_it_lets_a_nan_run_finish(tmp_path):
    trainer = _fit(tmp_path, NaNFromStep(bad_step=2), DivergenceGuard(enabled=False), epochs=1)
    assert trainer.global_step == 4


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_check_interval_must_be_a_positive_integer(every):
    with pytest.raises(ValueError, match=f"check_every_n_steps must be an integer >= 1, got {every!r}"):
        DivergenceGuard(check_every_n_steps=every)
