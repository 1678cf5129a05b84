"""`maxdrop tune`: tune a row's knobs with Optuna, each trial a normal `maxdrop fit` run folder, resumably.

    maxdrop tune configs/tune/study3/dropout.yaml --trials 16 --root results/study3/tune \\
      -- --config configs/study2/size/n100.yaml --data.data_dir ../shared/data/cifar10-jpeg.tar.gz

The study is named after the space file; its trials land in ``<root>/<study>/trials/trial_NNNN/`` (config.yaml,
event files with the HParams session, sparsity.json; no test pass: the objective is the validation
metric's value at the last validation, i.e. of the model a grid run would keep). Storage: Optuna's journal
file ``<root>/<study>/journal.log`` by default (several processes on one machine or a shared filesystem), or
``--storage`` with an RDB URL (``sqlite:///...``, ``postgresql://...``). Running the same command again
continues the study up to ``--trials`` finished (complete or pruned) trials; a trial left RUNNING by a dead
process (its claim, maxdrop/experiments/claims.py, is stale) is marked FAIL, its folder removed and its
parameters re-enqueued, so it reruns from scratch. Each trial is one subprocess running `maxdrop fit`
(and, with ``--test``, its test pass: the code path of `maxdrop grid`, so TensorBoard and `maxdrop report`
read trials like grid runs; a crash stays in its trial). At the end: ``best.yaml`` (the best trial's full
config, for `maxdrop fit`/`maxdrop grid`), ``trials.csv``/``trials.md`` and ``history.png``/``knobs.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from maxdrop.experiments.claims import STALE_AFTER_SECONDS, claim_path, is_stale, try_claim
from maxdrop.experiments.grid import _logger, job_resources, sequence_command
from maxdrop.experiments.progress import Progress, say
from maxdrop.experiments.tune_pruning import OBJECTIVE, PRUNED_MARKER, make_pruner, open_storage
from maxdrop.experiments.tune_space import Space, load_space

CALLBACK = "maxdrop.experiments.tune_pruning.OptunaPruning"


def trial_dir(study_dir: Path, number: int) -> Path:
    return study_dir / "trials" / f"trial_{number:04d}"


def recover(study, study_dir: Path, stale_after: float = STALE_AFTER_SECONDS) -> list[int]:
    """Trials RUNNING in the storage whose process is dead: FAIL them, remove their folders and enqueue
    their parameters again. Returns their numbers."""
    from optuna.trial import TrialState

    recovered = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        run = trial_dir(study_dir, t.number)
        started = t.datetime_start.timestamp() if t.datetime_start else 0.0
        no_claim_yet = not claim_path(run).exists() and time.time() - started < 60
        if no_claim_yet or (claim_path(run).exists() and not is_stale(claim_path(run), stale_after)):
            continue  # alive, or a process between asking for the trial and claiming its folder
        claim = try_claim(run, stale_after)
        if claim is None:
            continue
        with claim:
            if study.get_trials(deepcopy=False)[t.number].state != TrialState.RUNNING:
                continue  # another process recovered it first
            shutil.rmtree(run, ignore_errors=True)
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            recovered.append(t.number)
    return recovered


class Tuner:
    def __init__(self, space: Space, study, study_dir: Path, storage: str, args, extra: list[str]):
        self.space, self.study, self.study_dir, self.storage = space, study, study_dir, storage
        self.args, self.extra = args, extra
        self.lock = threading.Lock()
        self.failures: list[int] = []
        self.progress = Progress(args.trials, args.jobs, prefix="[tune]")

    def counts(self) -> tuple[int, int]:
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        return done, sum(t.state == TrialState.RUNNING for t in trials)

    def command(self, trial, params: dict, threads: int | None) -> list[str]:
        run = trial_dir(self.study_dir, trial.number)
        share = ["--num_threads", str(threads)] if threads else []
        return [
            "fit", "--config", str(self.space.config), *share, *self.extra,
            *self.space.overrides(params), "--seed_everything", str(self.args.seed),
            "--trainer.logger", _logger(self.study_dir, "trials", run.name),
            f"--trainer.callbacks+={CALLBACK}",
        ]  # fmt: skip

    def test_command(self, run: Path, threads: int | None) -> list[str]:
        """``--test``: the test pass of a complete trial from its last.ckpt into ``test/`` (as `maxdrop grid`
        does), so that `maxdrop report` tabulates trials; it plays no part in the choice of the best trial."""
        share = ["--num_threads", str(threads)] if threads else []
        return [
            "test", "--config", str(run / "config.yaml"), *share,
            "--trainer.logger", _logger(self.study_dir, "trials", run.name, "test"),
            "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
        ]  # fmt: skip

    def run_trial(self, trial, threads: int | None, env: dict | None) -> None:
        from optuna.trial import TrialState

        params = {k.name: k.suggest(trial) for k in self.space.knobs}
        run = trial_dir(self.study_dir, trial.number)
        claim = try_claim(run)
        if claim is None:  # cannot happen for a fresh trial number unless the folder is reused by hand
            raise RuntimeError(f"maxdrop tune: {run} is claimed by another process")
        with claim:
            shutil.rmtree(run, ignore_errors=True)
            trial.set_user_attr("run_dir", str(run))
            env = dict(env or os.environ)
            env.update(
                MAXDROP_TUNE_STORAGE=self.storage, MAXDROP_TUNE_STUDY=self.study.study_name,
                MAXDROP_TUNE_TRIAL_ID=str(trial._trial_id), MAXDROP_TUNE_METRIC=self.args.metric,
                MAXDROP_TUNE_PRUNER=self.args.pruner,
            )  # fmt: skip
            say(f"[tune] trial {trial.number} {params} -> {run}")
            cmds: list = [self.command(trial, params, threads)]
            if self.args.test:  # not for a pruned trial: its fit leaves the marker
                cmds.append({"argv": self.test_command(run, threads), "unless": str(run / PRUNED_MARKER)})
            code = subprocess.run(sequence_command(cmds), env=env).returncode
            objective = run / OBJECTIVE
            with self.lock:
                if code != 0 or not objective.exists():
                    say(f"[tune] trial {trial.number} FAILED (exit {code}); see its output above", sys.stderr)
                    self.study.tell(trial, state=TrialState.FAIL)
                    self.failures.append(trial.number)
                    return
                result = json.loads(objective.read_text())
                if result["pruned"]:
                    say(f"[tune] trial {trial.number} pruned at epoch {result['step']}")
                    self.study.tell(trial, state=TrialState.PRUNED)
                else:
                    self.study.tell(trial, result["value"])

    def worker(self, threads: int | None, env: dict | None) -> None:
        while not self.failures:
            with self.lock:
                done, running = self.counts()
                if done + running >= self.args.trials:
                    return
                trial = self.study.ask()
            start = time.time()
            self.run_trial(trial, threads, env)
            with self.lock:
                self.progress.durations.append(time.time() - start)
                self.progress.show(*self.counts())

    def run(self) -> None:
        threads, envs = job_resources(self.args.jobs)
        workers = [threading.Thread(target=self.worker, args=(threads, env)) for env in envs]
        for w in workers:
            w.start()
        for w in workers:
            w.join()


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="maxdrop tune",
        description=__doc__.split("\n\n")[0] + " Arguments after `--` go to every trial's `maxdrop fit`.",
    )
    parser.add_argument("space", type=Path, help="search-space YAML (config: + knobs:), e.g. configs/tune/x.yaml")
    parser.add_argument("--trials", type=int, default=16, help="finished (complete or pruned) trials wanted")
    parser.add_argument("--root", type=Path, default=Path("lightning_logs/tune"), help="studies land in ROOT/<study>/")
    parser.add_argument("--study", help="study name (default: the space file's stem)")
    parser.add_argument("--storage", help="journal file path or RDB URL (default: <root>/<study>/journal.log)")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once in this process (threads split)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of every trial")
    parser.add_argument("--sampler-seed", type=int, default=0, help="TPE sampler seed (vary it per SLURM task)")
    parser.add_argument("--metric", default="val/error", help="logged validation metric (default %(default)s)")
    parser.add_argument("--direction", choices=("minimize", "maximize"), default="minimize")
    parser.add_argument(
        "--pruner",
        default="median",
        help="median[:STARTUP[:WARMUP]] (default 4 trials, 10 epochs), threshold:UPPER or none",
    )
    parser.add_argument(
        "--test", action="store_true", help="test pass of each complete trial, for `maxdrop report` (not for choosing)"
    )
    parser.add_argument("--stale-after", type=float, default=STALE_AFTER_SECONDS, help="see `maxdrop grid --help`")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        import optuna
    except ImportError:
        print("maxdrop tune: error: Optuna is missing: pip install 'maxdrop[tune]'", file=sys.stderr)
        return 2
    try:
        space = load_space(args.space)
        pruner = make_pruner(args.pruner)
        if args.trials < 1 or args.jobs < 1:
            raise ValueError(f"--trials and --jobs must be >= 1, got {args.trials} and {args.jobs}")
    except ValueError as e:
        print(f"maxdrop tune: error: {e}", file=sys.stderr)
        return 2
    name = args.study or space.path.stem
    study_dir = args.root / name
    storage = args.storage or str(study_dir / "journal.log")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name, storage=open_storage(storage), pruner=pruner, direction=args.direction, load_if_exists=True,
    )  # fmt: skip
    # A resumed study must not replay the random start-up proposals it already made: offset the seed by the
    # trials so far (0 for a fresh study, so a single-process study stays reproducible).
    study.sampler = optuna.samplers.TPESampler(seed=args.sampler_seed + len(study.get_trials(deepcopy=False)))
    recovered = recover(study, study_dir, args.stale_after)
    if recovered:
        say(f"[tune] trials {recovered} were left RUNNING by a dead process: marked FAIL, re-enqueued")
    tuner = Tuner(space, study, study_dir, storage, args, extra)
    tuner.run()
    from maxdrop.experiments.tune_outputs import write_outputs

    best = write_outputs(study, space, study_dir, args.metric)
    if best is not None:
        say(f"[tune] best: trial {best.number}, {args.metric} {best.value:.4g}, {best.params}")
        say(f"[tune] its config: {study_dir / 'best.yaml'}")
    if tuner.failures:
        say(f"[tune] trials {tuner.failures} failed; rerun the same command to go on", sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
