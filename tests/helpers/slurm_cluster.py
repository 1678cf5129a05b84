"""A one-node SLURM cluster (munged, slurmctld, slurmd) started from a temporary folder, for the scheduler tests.

Everything lives under one folder: the munge key and socket, ``slurm.conf``, the controller's state, the
node's spool, logs and pid files. The daemons run in the foreground as children of the test process, talk
over 127.0.0.1 only on free ports, and are stopped by their pids. Clients (sbatch, squeue, scontrol,
scancel, and the jobs' own ``scontrol requeue``) find the cluster through ``SLURM_CONF``.

Debian/Ubuntu: ``apt-get install slurm-wlm munge`` provides the binaries (``.ci/run`` installs them in CI).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers.net import free_port

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def missing_binaries() -> list[str]:
    """The SLURM/munge programs that are not on PATH (nor in /usr/sbin, where Debian puts the daemons)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [b for b in BINARIES if shutil.which(b, path=path) is None]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return max(1024, total_kb // 1024 - 1024)  # leave the OS 1 GB


class SlurmCluster:
    """A running one-node cluster; :meth:`stop` ends its daemons (by pid) and nothing else.

    Args:
        root: an empty folder for the cluster's files.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ daemons

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munged()
        self._write_conf()
        self._procs.append(self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld"))
        self._procs.append(self._daemon(["slurmd", "-D", "-f", str(self.conf), "-N", self.host], "slurmd"))
        try:
            self.wait_for(lambda: self._node_state() == "idle", timeout, "the node to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        munge = self.root / "munge"
        os.chmod(munge, 0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = munge / "munge.socket"
        self._procs.append(
            self._daemon(
                [
                    "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                    f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}",
                ],
                "munged",
            )
        )  # fmt: skip
        self.wait_for(self.munge_socket.exists, 20, "munged's socket")

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            f"""\
ClusterName=maxdroptest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={self.munge_socket},cred_expire=5
# bind the daemons' ports to 127.0.0.1 (the addresses below), not to every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
SchedulerParameters=sched_interval=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def _daemon(self, cmd: list[str], name: str) -> subprocess.Popen:
        out = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start (status {proc.returncode}):\n{self.log(name)}")
        return proc

    def stop(self) -> None:
        """End the daemons (slurmd, slurmctld, munged, in that order) and any job processes they left."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()

    def log(self, name: str) -> str:
        """The tail of a daemon's log (for failure messages)."""
        texts = []
        for path in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"):
            if path.exists():
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    # ------------------------------------------------------------------ clients

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None) -> str:
        """Run a SLURM client against this cluster; its stdout (an error names the command and its output)."""
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc.stdout

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        """Submit a job (``sbatch --parsable ARGS``) from ``cwd``; its job id."""
        return self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, BeginTime, ...); {} once the job is forgotten."""
        proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {}
        fields: dict[str, str] = {}
        for line in proc.stdout.splitlines():  # an array job: one line per task, the last one wins per key
            fields.update(dict(re.findall(r"(\w+)=(\S*)", line)))
        return fields

    def states(self, job_id: str) -> list[str]:
        """The state of each task of a job (one entry for a plain job, one per array task)."""
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True, text=True
        ).stdout
        return re.findall(r"JobState=(\S+)", out)

    def wait_for(self, ready: Callable[[], object], timeout: float, what: str, every: float = 0.2):
        """Poll ``ready()`` until it is truthy; its value. A TimeoutError names ``what`` and the daemons' logs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = ready()
            if value:
                return value
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} died while waiting for {what}:\n{self.log(proc.args[0])}")
            time.sleep(every)
        logs = "\n".join(f"--- {name}\n{self.log(name)}" for name in ("slurmctld", "slurmd"))
        raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{logs}")

    def wait_done(self, job_id: str, timeout: float) -> list[str]:
        """Wait until every task of the job has ended; their final states (COMPLETED, FAILED, ...)."""
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")

        def done() -> list[str] | None:
            states = self.states(job_id)
            return states if states and all(s in ended for s in states) else None

        return self.wait_for(done, timeout, f"job {job_id} to end")

    def _node_state(self) -> str:
        proc = subprocess.run(
            ["sinfo", "-h", "-N", "-n", self.host, "-o", "%t"], env=self.env, capture_output=True, text=True
        )
        return proc.stdout.strip() if proc.returncode == 0 else ""
