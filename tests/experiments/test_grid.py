"""`maxdrop grid` then `maxdrop report`, end to end through the real CLI on tiny data."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from maxdrop.experiments.grid import commands, main, pairs
from maxdrop.experiments.report import report
from tests.helpers.data import tiny_run_config
from tests.helpers.net import free_port

CONFIG = tiny_run_config("DATA", slots="SLOTS", lr_scheduler=None, data={"batch_size": 16})


@pytest.fixture
def grid_configs(tmp_path, tiny_tree) -> list[Path]:
    out = []
    for name, slots in (
        ("baseline", "null"),
        ("maxdropout", "{stage1: {class_path: maxdrop.MaxDropout, init_args: {p: 0.3}}}"),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(CONFIG.replace("DATA", str(tiny_tree)).replace("SLOTS", slots))
        out.append(path)
    return out


def test_pairs_and_commands(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert pairs([a, b], [0, 1]) == [(a, 0), (a, 1), (b, 0), (b, 1)]
    with pytest.raises(ValueError, match=r"config names must be unique .*repeated: a"):
        pairs([a, tmp_path / "x" / "a.yaml"], [0])
    fit, test, active = commands(a, 3, tmp_path / "root", ["--trainer.max_epochs", "1"], active_in_eval=True)
    assert fit[0] == "fit" and "--ckpt_path" not in fit  # nothing to resume yet
    assert fit[fit.index("--seed_everything") + 1] == "3" and "--trainer.max_epochs" in fit
    assert json.loads(test[test.index("--trainer.logger") + 1])["init_args"]["sub_dir"] == "test"
    assert "--trainer.callbacks+=maxdrop.callbacks.MaxDropoutActiveInEval" in active


def test_bad_input(tmp_path, capsys):
    assert main([str(tmp_path / "missing.yaml")]) == 2
    assert "config file(s) not found" in capsys.readouterr().err
    cfg = tmp_path / "a.yaml"
    cfg.write_text("{}")
    assert main([str(cfg), "--seeds", "0", "--index", "5"]) == 2
    assert "--index 5 is outside 0..0" in capsys.readouterr().err


@pytest.mark.slow
def test_grid_runs_skips_resumes_and_feeds_the_report(tmp_path, grid_configs, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    root = tmp_path / "study"
    args = [*map(str, grid_configs), "--seeds", "0", "1", "--root", str(root), "--active-in-eval"]
    assert main(args) == 0
    runs = sorted(p.parent for p in root.rglob("finished.json"))
    assert [f"{p.parent.name}/{p.name}" for p in runs] == [
        "baseline/seed_0", "baseline/seed_1", "maxdropout/seed_0", "maxdropout/seed_1",
    ]  # fmt: skip
    for run in runs:
        assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
        assert list((run / "test").glob("events.out.tfevents.*"))

    # Interrupted after fit: finished marker and test results gone. Rerun: resumes, redoes the test only.
    victim = root / "maxdropout" / "seed_1"
    (victim / "finished.json").unlink()
    mtime = (victim / "checkpoints" / "last.ckpt").stat().st_mtime
    assert main(args) == 0
    assert (victim / "finished.json").exists()
    assert (victim / "checkpoints" / "last.ckpt").stat().st_mtime >= mtime

    text = report([root], tmp_path / "report", baseline="baseline")
    with open(tmp_path / "report" / "report.csv") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    assert rows["baseline"]["seeds"] == "2" and rows["maxdropout"]["seeds"] == "2"
    assert rows["maxdropout"]["dropped fraction, last epoch"].startswith("stage1 ")
    assert rows["maxdropout"]["test error %, MaxDropout on in eval"] != "-"
    assert "Unfinished" not in text


@pytest.mark.slow
def test_a_ddp_pair_runs_fit_and_both_test_passes_on_two_ranks(tmp_path, grid_configs, monkeypatch):
    """The pair's commands share one process per rank: the launcher's second rank re-runs the sequence and
    follows the parent through fit and both test passes (a rank left behind would hang the test pass)."""
    monkeypatch.setattr(sys, "argv", ["maxdrop"])
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    root = tmp_path / "study"
    args = [str(grid_configs[1]), "--seeds", "0", "--root", str(root), "--active-in-eval"]
    assert main([*args, "--", "--trainer.strategy", "ddp", "--trainer.devices", "2"]) == 0
    run = root / "maxdropout" / "seed_0"
    assert (run / "finished.json").exists()
    for sub in ("test", "test_active_in_eval"):
        tags = EventAccumulator(str(next((run / sub).glob("events.out.tfevents.*")))).Reload().Tags()["scalars"]
        assert "test/error" in tags, (sub, tags)
