"""`maxdrop tune` through the CLI on tiny data: trials are run folders, best.yaml, resume after a kill, pruning."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from maxdrop.cli import main as maxdrop_main
from maxdrop.experiments.tune import main
from maxdrop.experiments.tune_space import load_space
from tests.helpers.data import tiny_run_config

P_KEY = "model.init_args.backbone.init_args.slots.stage1.init_args.p"


@pytest.fixture
def space(tmp_path, tiny_tree) -> Path:
    slots = {"stage1": {"class_path": "maxdrop.MaxDropout", "init_args": {"p": 0.3}}}
    (tmp_path / "row.yaml").write_text(tiny_run_config(str(tiny_tree), slots=slots, lr_scheduler=None))
    path = tmp_path / "tiny.yaml"
    knobs = {"p": {"type": "float", "low": 0.05, "high": 0.6, "keys": [P_KEY]}}
    path.write_text(yaml.safe_dump({"config": "row.yaml", "knobs": knobs}))
    return path


def _tune(space: Path, root: Path, *args: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "maxdrop", "tune", str(space), "--root", str(root), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _load(root: Path, name: str = "tiny"):
    import optuna

    from maxdrop.experiments.tune_pruning import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(str(root / name / "journal.log")))


def test_bad_space_and_arguments(tmp_path, space, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"config": "row.yaml", "knobs": {"p": {"type": "float", "low": 0, "high": 1}}}))
    assert main([str(bad)]) == 2
    assert "knob 'p' needs `keys:`" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"config": "row.yaml", "knobs": {"p": {"type": "real", "keys": ["a"]}}}))
    assert main([str(bad)]) == 2
    assert "has type 'real'; allowed: float, int, categorical" in capsys.readouterr().err
    assert main([str(space), "--pruner", "sometimes"]) == 2
    assert "allowed are median" in capsys.readouterr().err
    knob = load_space(space).knobs[0]
    assert load_space(space).overrides({"p": 0.25}) == [f"--{P_KEY}", "0.25"] and knob.keys == (P_KEY,)


@pytest.mark.slow
def test_tune_runs_trials_resumes_after_a_kill_and_writes_the_best_config(tmp_path, space, capsys):
    root = tmp_path / "tune"
    args = ("--trials", "3", "--pruner", "none", "--test", "--", "--trainer.max_epochs", "1")
    # Killed (the tuner and its fit) while trial 1 runs; trial 0 is finished by then.
    proc = _tune(space, root, *args, start_new_session=True)
    deadline = time.time() + 600
    while not (root / "tiny" / "trials" / "trial_0001" / "config.yaml").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()  # reaps it and closes its pipe
    before = {t.number: (t.state.name, t.value) for t in _load(root).get_trials()}
    assert before[0][0] == "COMPLETE" and before[1][0] == "RUNNING", before

    again = _tune(space, root, *args)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert "trials [1] were left RUNNING by a dead process: marked FAIL, re-enqueued" in out, out
    trials = _load(root).get_trials()
    assert (trials[0].state.name, trials[0].value) == before[0]  # kept, not rerun
    assert trials[1].state.name == "FAIL"
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and complete[1].params == trials[1].params  # the killed trial's p, retried
    for t in complete:
        run = Path(t.user_attrs["run_dir"])
        assert (run / "config.yaml").exists() and (run / "sparsity.json").exists()
        assert list(run.glob("events.out.tfevents.*")) and list((run / "test").glob("events.out.tfevents.*"))
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert (
            saved["model"]["init_args"]["backbone"]["init_args"]["slots"]["stage1"]["init_args"]["p"] == t.params["p"]
        )
    assert not (root / "tiny" / "trials" / "trial_0001").exists()  # the dead trial's half-run folder

    best = _load(root).best_trial
    text = (root / "tiny" / "best.yaml").read_text()
    with pytest.raises(SystemExit) as printed:
        maxdrop_main(["fit", "--config", str(root / "tiny" / "best.yaml"), "--print_config"])
    assert printed.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (
        resolved["model"]["init_args"]["backbone"]["init_args"]["slots"]["stage1"]["init_args"]["p"] == best.params["p"]
    )
    assert resolved["trainer"]["max_epochs"] == 1 and resolved["trainer"]["logger"] in (None, True)
    assert "OptunaPruning" not in text
    rows = (root / "tiny" / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,state,value,last epoch,p,seconds") and len(rows) == 5
    assert (root / "tiny" / "history.png").stat().st_size and (root / "tiny" / "knobs.png").stat().st_size

    from maxdrop.experiments.report import report

    text = report([root / "tiny" / "trials"], tmp_path / "report")  # read like grid runs (--test gave them test/)
    with open(tmp_path / "report" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["seeds"]) for r in rows) == 3 and "Unfinished" not in text


@pytest.mark.slow
def test_pruning_stops_a_trial_early(tmp_path, space):
    root = tmp_path / "tune"
    # ThresholdPruner(upper=-1): any validation error is above it, so the trial is pruned at its first epoch.
    out, _ = _tune(
        space, root, "--trials", "1", "--pruner", "threshold:-1", "--test", "--", "--trainer.max_epochs", "3"
    ).communicate(timeout=600)
    assert "trial 0 pruned at epoch 0" in out, out
    (trial,) = _load(root).get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    objective = json.loads((Path(trial.user_attrs["run_dir"]) / "objective.json").read_text())
    assert objective["pruned"] and objective["step"] == 0  # stopped after 1 of 3 epochs
    assert not (Path(trial.user_attrs["run_dir"]) / "test").exists()  # --test skips a pruned trial
    assert not (root / "tiny" / "best.yaml").exists()  # no trial completed
