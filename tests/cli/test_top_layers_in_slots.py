"""TopKDropout and TopDropBlock in a model's slots through `maxdrop fit`: the sparsity summary counts
exactly what their literal transcriptions drop."""

import sys
from pathlib import Path

import pytest
import yaml

from maxdrop import TopKDropout
from maxdrop.callbacks import load_sparsity_summary
from maxdrop.cli import MaxdropCLI
from tests.helpers.data import tiny_run_config
from tests.helpers.monitoring import RecordedClassifier
from tests.helpers.references import top_drop_block_reference, topk_reference


class TopRecordedClassifier(RecordedClassifier):
    """The project's module with independent counts of what the two layers drop (for the CLI test)."""

    def install_recorder(self) -> None:
        super().install_recorder()
        self.reference_dropped: dict[tuple[int, str], int] = {}
        for name, layer in self.backbone.dropout_slots().items():
            layer.register_forward_hook(self._reference_hook(name))

    def _reference_hook(self, name: str):
        def hook(layer, args, y):
            if self._phase != "train":
                return
            x = args[0].detach()
            if isinstance(layer, TopKDropout):
                dropped = int(topk_reference(x, layer.rate, layer.scope).sum())
            else:
                dropped = int(top_drop_block_reference(x, layer.h_ratio).sum()) * x.shape[1] * x.shape[3]
            key = (self.current_epoch, name)
            self.reference_dropped[key] = self.reference_dropped.get(key, 0) + dropped

        return hook


@pytest.mark.slow
def test_cli_fit_with_both_layers_in_slots_counts_what_they_drop(tmp_path, monkeypatch, tiny_tree):
    slots = {
        "stage1": {"class_path": "maxdrop.TopKDropout", "init_args": {"rate": 0.3, "scope": "sample"}},
        "stage2": {"class_path": "maxdrop.TopDropBlock", "init_args": {"h_ratio": 0.33}},
    }
    config = yaml.safe_load(tiny_run_config(str(tiny_tree), slots=slots, trainer={"limit_train_batches": 3}))
    config["model"]["class_path"] = f"{__name__}.TopRecordedClassifier"
    (tmp_path / "top.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    run = MaxdropCLI(args=["fit", "--config", "top.yaml"])
    assert isinstance(run.model.backbone.stage_slots["stage1"], TopKDropout)
    records = load_sparsity_summary(Path(run.trainer.log_dir))["records"]
    assert {(r["epoch"], r["slot"]) for r in records} == set(run.model.reference_dropped)
    for rec in records:
        assert rec["dropped"] == run.model.reference_dropped[(rec["epoch"], rec["slot"])] > 0, rec
