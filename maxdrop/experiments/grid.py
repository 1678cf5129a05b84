"""`maxdrop grid`: run configs x seeds through the CLI, one run folder each, resumably.

    maxdrop grid configs/a.yaml configs/b.yaml --seeds 0 1 2 --root lightning_logs/study -- --trainer.max_epochs 10

Each (config, seed) lands in ``<root>/<config stem>/seed_<seed>/`` (the fit's config.yaml, event files,
checkpoints), its test pass in ``test/`` and, with ``--active-in-eval``, a second test pass with
MaxDropout left on (the authors' protocol) in ``test_active_in_eval/``. A run that finished has a
``finished.json`` and is skipped; an interrupted one resumes from its ``last.ckpt`` (or starts over
when it had none), so rerunning the same command after a crash or a kill completes the grid.
On a cluster, ``--index I`` runs only the I-th pair (``--list`` prints them): one SLURM array task each.
A pair's commands run in one process (``python -m maxdrop.cli.sequence``), which starts Python, torch and
Lightning once per pair rather than once per command.

``--jobs N`` runs N pairs at once (``num_threads`` split between them; one GPU each where there are
GPUs). Any number of grid processes may share one root (one machine, or SLURM tasks on a shared
filesystem): each pair is claimed atomically before it runs (maxdrop/experiments/claims.py), so no pair
runs twice and no process deletes another's run; the claim of a dead process is taken over and its
run resumed. A process waits for the pairs others hold, so when it exits 0 every pair is finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from maxdrop.experiments.claims import STALE_AFTER_SECONDS, try_claim
from maxdrop.experiments.progress import Progress, say
from maxdrop.utils.atomic import atomic_write_text

FINISHED = "finished.json"


def _logger(root: Path, name: str, version: str, sub_dir: str | None = None) -> str:
    init = {"save_dir": str(root), "name": name, "version": version}
    if sub_dir:
        init["sub_dir"] = sub_dir
    return json.dumps({"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": init})


def pairs(configs: list[Path], seeds: list[int]) -> list[tuple[Path, int]]:
    stems = [c.stem for c in configs]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise ValueError(f"config names must be unique (they name the run folders); repeated: {', '.join(sorted(dup))}")
    return [(c, s) for c in configs for s in seeds]


def commands(
    config: Path, seed: int, root: Path, extra: list[str], active_in_eval: bool, threads: int | None = None
) -> list[list[str]]:
    """The ``maxdrop`` command lines of one run: fit (resuming if it can), test, and the authors' eval
    protocol (``maxdrop.cli.sequence`` runs them in one process). ``threads`` (``--jobs``' share of the
    cores) comes before ``extra``, so a ``--num_threads`` there wins."""
    name, version = config.stem, f"seed_{seed}"
    run_dir = root / name / version
    last = run_dir / "checkpoints" / "last.ckpt"
    share = ["--num_threads", str(threads)] if threads else []
    common = ["--config", str(config), *share, *extra, "--seed_everything", str(seed)]

    def cli(sub: str, *args: str) -> list[str]:
        return [sub, *common, *args]

    fit = cli("fit", "--trainer.logger", _logger(root, name, version))
    if last.exists():
        fit += ["--ckpt_path", str(last)]
    test = cli("test", "--trainer.logger", _logger(root, name, version, "test"), "--ckpt_path", str(last))
    cmds = [fit, test]
    if active_in_eval:
        cmds.append(
            cli(
                "test",
                "--trainer.logger",
                _logger(root, name, version, "test_active_in_eval"),
                "--trainer.callbacks+=maxdrop.callbacks.MaxDropoutActiveInEval",
                "--ckpt_path",
                str(last),
            )
        )
    return cmds


def sequence_command(cmds: list) -> list[str]:
    """One process that runs ``cmds`` (``maxdrop`` command lines) in turn, stopping at the first failure."""
    return [sys.executable, "-m", "maxdrop.cli.sequence", json.dumps(cmds)]


def run_dir_of(root: Path, config: Path, seed: int) -> Path:
    return root / config.stem / f"seed_{seed}"


def run_one(
    config: Path,
    seed: int,
    root: Path,
    extra: list[str],
    active_in_eval: bool,
    threads: int | None = None,
    env: dict[str, str] | None = None,
) -> bool:
    """Run one pair (the caller holds its claim)."""
    run_dir = run_dir_of(root, config, seed)
    if (run_dir / FINISHED).exists():
        say(f"[grid] done already: {run_dir}")
        return True
    if run_dir.exists() and not (run_dir / "checkpoints" / "last.ckpt").exists():
        # Interrupted before its first checkpoint: its partial logs would pollute the report.
        shutil.rmtree(run_dir)
    for sub in ("test", "test_active_in_eval"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)  # a test pass is redone whole
    start = time.time()
    cmds = commands(config, seed, root, extra, active_in_eval, threads)
    say(f"[grid] {' + '.join(c[0] for c in cmds)} {config} seed {seed} -> {run_dir}")
    if subprocess.run(sequence_command(cmds), env=env).returncode != 0:
        say(f"[grid] FAILED: {config} seed {seed} (rerun the same command to retry)", sys.stderr)
        return False
    done = {"config": str(config), "seed": seed, "seconds": time.time() - start}
    atomic_write_text(run_dir / FINISHED, json.dumps(done))
    return True


def job_resources(jobs: int) -> tuple[int | None, list[dict[str, str] | None]]:
    """Threads per job and each job slot's environment: with several jobs, the cores split evenly and,
    where there are GPUs, one (of CUDA_VISIBLE_DEVICES, if set) per slot, round robin."""
    if jobs == 1:
        return None, [None]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = [g for g in visible.split(",") if g.strip()]
    else:
        import torch  # only here: the grid itself needs no torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        return threads, [None] * jobs
    return threads, [{**os.environ, "CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} for i in range(jobs)]


def run_grid(
    todo: list[tuple[Path, int]],
    root: Path,
    extra: list[str],
    active_in_eval: bool = False,
    jobs: int = 1,
    stale_after: float = STALE_AFTER_SECONDS,
    poll: float = 5.0,
) -> list[tuple[Path, int]]:
    """Run the pairs, ``jobs`` at a time, each under its claim; returns those that failed here."""
    threads, envs = job_resources(jobs)
    progress = Progress(len(todo), jobs)
    pending, running, failed = list(todo), {}, []
    free = list(range(jobs))

    def finished() -> int:
        return sum((run_dir_of(root, c, s) / FINISHED).exists() for c, s in todo)

    with ThreadPoolExecutor(jobs) as pool:
        while pending or running:
            for pair in list(pending):
                if not free:
                    break
                run_dir = run_dir_of(root, *pair)
                if (run_dir / FINISHED).exists():
                    pending.remove(pair)
                    continue
                claim = try_claim(run_dir, stale_after)
                if claim is None:
                    continue  # another process runs it; wait for it (or for its claim to go stale)
                pending.remove(pair)
                if claim.took_over:
                    say(f"[grid] took over the stale claim of {run_dir}")
                slot = free.pop(0)
                fut = pool.submit(run_one, *pair, root, extra, active_in_eval, threads, envs[slot])
                running[fut] = (pair, claim, slot, time.time())
                progress.show(finished(), len(running))
            if not running:
                time.sleep(poll)
                continue
            done, _ = wait(running, timeout=poll, return_when=FIRST_COMPLETED)
            for fut in done:
                pair, claim, slot, start = running.pop(fut)
                claim.release()
                free.append(slot)
                if fut.exception() is not None:
                    say(f"[grid] FAILED: {pair[0]} seed {pair[1]}: {fut.exception()!r}", sys.stderr)
                if fut.exception() is not None or not fut.result():
                    failed.append(pair)
                else:
                    progress.durations.append(time.time() - start)
            if done:
                progress.show(finished(), len(running))
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(prog="maxdrop grid", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=Path("lightning_logs/grid"))
    parser.add_argument("--active-in-eval", action="store_true", help="also test with MaxDropout on in eval")
    parser.add_argument("--index", type=int, help="run only the I-th (config, seed) pair, e.g. SLURM_ARRAY_TASK_ID")
    parser.add_argument("--list", action="store_true", help="print the (config, seed) pairs with their index")
    parser.add_argument("--jobs", type=int, default=1, help="pairs run at once (threads split; one GPU each)")
    parser.add_argument(
        "--stale-after",
        type=float,
        default=STALE_AFTER_SECONDS,
        help="seconds without a heartbeat after which another host's claim counts as dead (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        print(f"maxdrop grid: error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        print(f"maxdrop grid: error: config file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        todo = pairs(args.configs, args.seeds)
    except ValueError as e:
        print(f"maxdrop grid: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for i, (c, s) in enumerate(todo):
            print(f"{i}\t{c}\tseed {s}")
        return 0
    if args.index is not None:
        if not 0 <= args.index < len(todo):
            print(f"maxdrop grid: error: --index {args.index} is outside 0..{len(todo) - 1}", file=sys.stderr)
            return 2
        todo = [todo[args.index]]
    failed = run_grid(todo, args.root, extra, args.active_in_eval, args.jobs, args.stale_after)
    say(f"[grid] {len(todo) - len(failed)} of {len(todo)} runs finished")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
