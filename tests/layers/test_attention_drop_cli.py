"""ADL and DualAttentionDropBlock in FastCNN slots through `maxdrop fit`: monitored counts equal independent ones."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from maxdrop import ADL, DualAttentionDropBlock
from maxdrop.callbacks import load_sparsity_summary
from maxdrop.cli import MaxdropCLI
from maxdrop.monitoring.drop_masks import TAG, drop_map
from tests.helpers.data import tiny_run_config
from tests.helpers.monitoring import RecordedClassifier, images_of
from tests.helpers.references import dgdm_reference


def reference_count(layer, x: torch.Tensor, rng_state: torch.Tensor) -> int:
    """Elements the layer's rule zeroes, recomputed from the CPU random state it started from."""
    g = torch.Generator()
    g.set_state(rng_state)
    if isinstance(layer, ADL):  # the official rule: one float32 draw, then `attention < threshold` keeps
        use_drop = (torch.rand([], dtype=torch.float32, generator=g) + layer.drop_rate).floor() >= 1
        attention = torch.mean(x, dim=1, keepdim=True)
        threshold = attention.amax(dim=(2, 3), keepdim=True) * layer.drop_threshold
        return int((attention >= threshold).sum()) * x.shape[1] if use_drop else 0
    args = (layer.top_k_ratio, layer.channel_drop_rate, layer.drop_rate, layer.drop_threshold, layer.block_size)
    return int(dgdm_reference(x, *args, g)[2].sum())


class AttentionRecordedClassifier(RecordedClassifier):
    """The project's module with independent counts of what ADL and DGDM drop."""

    def install_recorder(self) -> None:
        super().install_recorder()
        self.reference_dropped: dict[tuple[int, str], int] = {}
        for name, layer in self.backbone.dropout_slots().items():
            layer.register_forward_pre_hook(self._save_rng)
            layer.register_forward_hook(self._reference_hook(name))

    def _save_rng(self, layer, args) -> None:
        self._rng_state = torch.get_rng_state()

    def _reference_hook(self, name: str):
        def hook(layer, args, y):
            if self._phase != "train":
                return
            key = (self.current_epoch, name)
            count = reference_count(layer, args[0].detach(), self._rng_state)
            self.reference_dropped[key] = self.reference_dropped.get(key, 0) + count

        return hook


@pytest.mark.slow
def test_cli_fit_with_adl_and_dgdm_in_slots_counts_what_they_drop(tmp_path, monkeypatch, tiny_tree):
    slots = {
        "stage1": {"class_path": "maxdrop.ADL", "init_args": {"drop_rate": 0.75, "drop_threshold": 0.8}},
        "stage2": {"class_path": "maxdrop.DualAttentionDropBlock", "init_args": {"block_size": 3}},
    }
    config = yaml.safe_load(
        tiny_run_config(str(tiny_tree), slots=slots, trainer={"limit_train_batches": 4, "max_epochs": 2})
    )
    config["model"]["class_path"] = f"{__name__}.AttentionRecordedClassifier"
    images = {"class_path": "maxdrop.callbacks.DropMaskImages", "init_args": {"every_n_epochs": 1, "num_images": 3}}
    config["trainer"]["callbacks"].append(images)
    (tmp_path / "attention.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    run = MaxdropCLI(args=["fit", "--config", "attention.yaml"])
    assert isinstance(run.model.backbone.stage_slots["stage1"], ADL)
    assert isinstance(run.model.backbone.stage_slots["stage2"], DualAttentionDropBlock)
    records = load_sparsity_summary(Path(run.trainer.log_dir))["records"]
    assert {(r["epoch"], r["slot"]) for r in records} == set(run.model.reference_dropped)
    for rec in records:
        assert rec["dropped"] == run.model.reference_dropped[(rec["epoch"], rec["slot"])] > 0, rec
    written = images_of(Path(run.trainer.log_dir))
    assert {f"{TAG}/stage1", f"{TAG}/stage2"} <= set(written)  # DropMaskImages shows both, no special hook


def test_drop_mask_images_show_what_they_zero():
    """DropMaskImages' map is generic (input vs output): the erased positions read 1, the rest 0."""
    x = torch.rand(2, 6, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5  # all active
    x[:, :, 2:4, 5:7] += 5  # the most attended region
    for layer in (ADL(1.0).train(), DualAttentionDropBlock(0.0, 0.0, 1.0, 0.8, 3).train()):
        y = layer(x)
        m = drop_map(x, y)
        assert m.shape == (2, 8, 8)
        assert torch.equal(m == 1, (y == 0).all(1)) and set(m.unique().tolist()) == {0.0, 1.0}
