"""What TensorBoard shows of CLI runs, read back from their event files: the CUSTOM SCALARS layout
(one chart per measure, every slot a line) and the HPARAMS sessions of a grid."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from maxdrop.cli import main
from maxdrop.experiments.grid import main as grid_main
from maxdrop.monitoring.tensorboard_layout import custom_scalars_layout
from tests.helpers.data import tiny_run_config

SLOTS = {
    "stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}},
    "block": {"class_path": "torch.nn.Dropout", "init_args": {"p": 0.1}},
}
STEP_MONITOR = {"class_path": "maxdrop.callbacks.SparsityMonitor", "init_args": {"log_every_n_batches": 2}}


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["maxdrop"])


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> layout_pb2.Layout:
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return layout


def _charts(layout: layout_pb2.Layout) -> dict[tuple[str, str], list[str]]:
    return {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}


def _fit(tmp_path: Path, tiny_tree: Path, slots, monitor: dict) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        tiny_run_config(
            str(tiny_tree), slots=slots, trainer={"max_epochs": 1, "log_every_n_steps": 1, "callbacks": [monitor]}
        )
    )
    main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(tmp_path)])
    return tmp_path / "lightning_logs" / "version_0"


def test_layout_has_a_line_per_slot_in_each_chart_of_the_run(tmp_path, tiny_tree):
    run = _fit(tmp_path, tiny_tree, SLOTS, STEP_MONITOR)
    acc = _events(run)
    charts = _charts(_layout(acc))
    scalars = acc.Tags()["scalars"]
    slot_names = ["block.0", "stage1", "block.1"]  # FastCNN(4, 8, 8): "block" fills one position per stage
    per_epoch = {k: v for k, v in charts.items() if k[0] == "maxdrop: slots per epoch"}
    per_step = {k: v for k, v in charts.items() if k[0] == "maxdrop: slots per step"}
    assert len(per_epoch) == 6 and len(per_step) == 3
    for (_, title), (regex,) in {**per_epoch, **per_step}.items():
        lines = [t for t in scalars if re.search(regex, t)]
        assert sorted(t.split("/")[1] for t in lines) == sorted(slot_names), title  # every slot, once
    # the metric charts draw the run's loss and error curves
    metric_regexes = [r for (cat, _), regexes in charts.items() if cat == "metrics" for r in regexes]
    metric_lines = {t for t in scalars for r in metric_regexes if re.search(r, t)}
    assert {"train/loss_step", "train/loss_epoch", "val/loss", "val/error", "val/best_error"} <= metric_lines


def test_run_without_slots_gets_the_metric_charts_only(tmp_path, tiny_tree):
    run = _fit(tmp_path, tiny_tree, None, STEP_MONITOR)
    assert [c.title for c in _layout(_events(run)).category] == ["metrics"]
    assert list(custom_scalars_layout([])) == ["metrics"]


def _hparams_experiment(root: Path):
    """The experiment the HPARAMS dashboard shows for ``--logdir root``, from TensorBoard's own plugin code."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import backend_context, metadata

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(root))
    backend = backend_context.Context(base_plugin.TBContext(logdir=str(root), multiplexer=mux, data_provider=provider))
    ctx = context.RequestContext()
    content = backend.hparams_metadata(ctx, "")
    experiment = backend.experiment_from_metadata(
        ctx, "", True, content, backend.hparams_from_data_provider(ctx, "", limit=None)
    )
    sessions = {
        run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG]).group_name
        for run, tags in content.items()
        if metadata.SESSION_START_INFO_TAG in tags
    }
    return experiment, dict(sorted(sessions.items()))


@pytest.mark.slow
def test_grid_runs_are_hparams_sessions_with_the_differing_keys_first(tmp_path, tiny_tree):
    configs = []
    for name, p in (("p03", 0.3), ("p05", 0.5)):
        slots = {"stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": p}}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(tiny_run_config(str(tiny_tree), slots=slots, lr_scheduler=None, trainer={"max_epochs": 1}))
        configs.append(str(path))
    root = tmp_path / "grid"
    assert grid_main([*configs, "--seeds", "0", "--root", str(root)]) == 0
    experiment, sessions = _hparams_experiment(root)
    # one session per run, named (the table's Trial ID) by the run's folder instead of a hash
    assert sessions == {"p03/seed_0": "p03/seed_0", "p05/seed_0": "p05/seed_0"}
    names = [h.name for h in experiment.hparam_infos]
    assert names[0] == "slot/stage1/p" and experiment.hparam_infos[0].differs
    assert not any(h.differs for h in experiment.hparam_infos[1:])
    assert {"seed", "backbone", "slot/stage1", "lr", "max_epochs", "batch_size", "augment/hflip"} <= set(names)
    metrics = {(m.name.group, m.name.tag) for m in experiment.metric_infos}
    assert {("test", "test/error"), ("test", "test/acc"), ("", "val/best_error")} <= metrics
    assert ("", "maxdrop/stage1/dropped_fraction") in metrics
    test_error = _events(root / "p05" / "seed_0" / "test").Scalars("test/error")
    assert len(test_error) == 1 and 0 <= test_error[0].value <= 100
