"""A real Slurm cluster on this one machine, for tests: a private munged, a slurmctld and one slurmd
per node, all children of the test process, all files under the directory the test gives.

    with SlurmCluster(tmp_path, [Node("n1", ["a100"], gpus=1), Node("n2", ["h100"])]) as cluster:
        job_id = cluster.sbatch("--constraint=h100", "--wrap", "sleep 1")
        assert cluster.wait_job_running(job_id) == "n2"

How it runs without a real cluster's plumbing (Debian's Slurm 22.05, as root, no systemd, no
cgroups):

- munged runs in the foreground with its own key, socket, pid and seed files; `AuthInfo=socket=`
  points every Slurm daemon and client at it, so the machine's munged (if any) plays no part.
- Every node gets `NodeHostname=<this host>` and a port of its own; Debian builds slurmd with
  MULTIPLE_SLURMD, so `slurmd -N <node>` serves one node and several run side by side.
  `SlurmdParameters=config_overrides` makes slurmd take the configured CPUs, memory and GPUs
  instead of refusing a node bigger than the machine: a 2-core box hosts two 4-CPU nodes.
- Process tracking is `proctrack/linuxproc` (parent pids from /proc) with `task/none`: no cgroups.
- Node features stand in for GPU pools (a100, h100); GPUs are faked with character devices
  (`mknod c 1 3`, i.e. /dev/null) listed in gres.conf, so `--gres=gpu:N` jobs get
  CUDA_VISIBLE_DEVICES exactly as on a GPU node.
- Ports are free TCP ports picked at start, so a test may run beside another cluster.
- A job starts within ~1 s of sbatch (0.6-0.9 s measured): slurmctld schedules on a 1 s tick,
  with the batching delay and the 30 s backfill interval turned down (see `_slurm_conf`).
- `start()` returns once an empty job has run on every node, so a broken job launch fails there,
  with the logs, rather than as a test waiting for a job that never starts.

Nothing is left running, even when a test fails: `stop()` (also on `__exit__`, and when `start()`
fails half way) cancels the jobs, stops slurmd before slurmctld (slurmd ignores SIGTERM while
slurmctld is gone, hence the SIGKILL fallback), then munged, and finally SIGKILLs any process
still carrying this cluster's SLURM_CONF in its environment (job processes and slurmstepd are
re-parented away from slurmd, so they are found that way rather than as children; a process a
test started with `cluster.env` goes too). Every wait has a timeout, and a timeout or a dead
daemon fails the test with the tails of the daemon logs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import pytest

T = TypeVar("T")

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
# Debian keeps the daemons in /usr/sbin, which is not on every PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
# Environment variables that change what Slurm clients do (a test run inside a Slurm job has
# plenty); dropped so the cluster under test sees only what the test passes.
CLIENT_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SQUEUE_", "SCANCEL_", "SINFO_", "SALLOC_", "SRUN_", "SCONTROL_")
# Unix socket paths are capped at 107 bytes; a slurmd spool dir holds `<node>_<job>.<step>` sockets.
MAX_SOCKET_DIR_CHARS = 60


@dataclass(frozen=True)
class Node:
    """One slurmd. `features` are what `--constraint` matches (Lathe's GPU pools)."""

    name: str
    features: list[str] = field(default_factory=list)
    gpus: int = 0
    # Four 1-CPU jobs at once per node; slurmd believes it because of config_overrides.
    cpus: int = 4
    memory_mb: int = 4096


class SlurmCommandError(RuntimeError):
    """A Slurm client (sbatch, squeue, scancel, …) exited non-zero."""

    def __init__(self, cmd: list[str], returncode: int, stdout: str, stderr: str):
        self.cmd, self.returncode, self.stdout, self.stderr = cmd, returncode, stdout, stderr
        super().__init__(f"`{' '.join(cmd)}` exited with {returncode}: {stderr.strip() or stdout.strip()}")


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def require_slurm():
    """Fails (not skips) the test when this machine cannot run the cluster."""
    missing = [tool for tool in (*DAEMONS, *CLIENTS, "munge") if find_tool(tool) is None]
    if missing:
        pytest.fail(f"Slurm is not installed (missing {', '.join(missing)}): run scripts/setup.sh as root, or "
                    "apt-get install --no-install-recommends slurmctld slurmd slurm-client munge", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests run their cluster as root (SlurmUser=root, fake GPU device nodes); "
                    "run them as root", pytrace=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Daemon:
    """One daemon in the foreground, its stdout and stderr in a file."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: Path, output: Path, log: Path | None):
        self.name, self.cmd, self.output, self.log = name, cmd, output, log
        with open(output, "wb") as out:
            self.popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, cwd=cwd, start_new_session=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float) -> bool:
        """SIGTERM, then SIGKILL after `grace` seconds; True once the process is gone."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.alive():
                return True
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=wait)
                return True
            except subprocess.TimeoutExpired:
                pass
        return not self.alive()

    def tail(self, lines: int) -> str:
        state = "running" if self.alive() else f"exited {self.popen.returncode}"
        parts = [f"=== {self.name} (pid {self.popen.pid}, {state}) ==="]
        # The daemon's own log file, else its output (the two say the same in foreground mode).
        for path in (self.log, self.output):
            text = path.read_text(errors="replace") if path is not None and path.exists() else ""
            if text.strip():
                parts.append(f"--- {path} (last {lines} lines) ---")
                parts.extend(text.splitlines()[-lines:])
                break
        return "\n".join(parts)


class SlurmCluster:
    """A munged, a slurmctld and a slurmd per node, started by `start()` or `with`, under `workdir`."""

    def __init__(self, workdir: Path, nodes: list[Node], *, kill_wait: int = 5,
                 extra_conf: dict[str, str] | None = None):
        """`kill_wait` is Slurm's KillWait: seconds between SIGTERM and SIGKILL when a job is
        cancelled or runs out of time. `extra_conf` adds or overrides slurm.conf keys."""
        names = [node.name for node in nodes]
        if not nodes or len(set(names)) != len(names):
            raise ValueError(f"a cluster needs nodes with distinct names, got {names}")
        self.workdir = Path(workdir).resolve()
        self.nodes = list(nodes)
        self.kill_wait = kill_wait
        self.extra_conf = dict(extra_conf or {})
        self.conf_dir = self.workdir / "etc"
        self.conf_path = self.conf_dir / "slurm.conf"
        self.log_dir = self.workdir / "log"
        self.state_dir = self.workdir / "state"
        self.dev_dir = self.workdir / "dev"
        # Batch jobs run here and write their output here (sbatch() defaults).
        self.jobs_dir = self.workdir / "jobs"
        self._socket_dir: Path | None = None
        self._own_socket_dir = False
        self.daemons: list[_Daemon] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_ENV_PREFIXES)}
        self.env["SLURM_CONF"] = str(self.conf_path)
        self.env["PATH"] = SEARCH_PATH

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, timeout: float = 30):
        """Starts munged, slurmctld and the slurmds, and waits until every node is idle. On any
        failure everything started so far is stopped before the error propagates."""
        require_slurm()
        try:
            self._write_files()
            self._start_munged(timeout)
            self._start_slurmctld(timeout)
            for node in self.nodes:
                self._start(f"slurmd-{node.name}", [find_tool("slurmd"), "-D", "-N", node.name, "-f",
                                                    str(self.conf_path)], self.log_dir / f"slurmd-{node.name}.log")
            self.wait_for(self._all_nodes_idle, timeout, "every node idle in sinfo")
            self._run_warmup_jobs(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float | None = None):
        """Cancels every job, stops the daemons (TERM, then KILL), kills what Slurm left running
        (any process with this cluster's SLURM_CONF in its environment). Safe to call twice, and
        after a failed start. Fails the test if a process survives."""
        timeout = timeout if timeout is not None else self.kill_wait + 15
        ctld = self._daemon("slurmctld")
        if ctld is not None and ctld.alive():
            try:
                self.cancel_all_jobs(timeout)
            except Exception as exc:  # still stop the daemons; the survivors are killed below
                print(f"slurm cluster: cancelling jobs at stop failed: {exc}")
        # slurmd before slurmctld: a slurmd whose controller is gone ignores SIGTERM.
        order = [d for d in self.daemons if d.name.startswith("slurmd")] + \
                [d for d in self.daemons if d.name in ("slurmctld", "munged")]
        survivors = [d.name for d in order if not d.stop(grace=5)]
        strays = self._kill_strays()
        if self._own_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._own_socket_dir = False
        if survivors or strays:
            pytest.fail(f"the Slurm cluster left processes behind: daemons {survivors}, others {strays}\n"
                        f"{self.logs()}", pytrace=False)

    # -- clients ------------------------------------------------------------------------------

    def run(self, *args, timeout: float = 30) -> str:
        """Runs a Slurm client (`run("squeue", "-h")`) against this cluster; returns its stdout.
        Raises SlurmCommandError with stderr when it exits non-zero."""
        cmd = [str(a) for a in args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env, cwd=self.workdir)
        if proc.returncode != 0:
            raise SlurmCommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    def sbatch(self, *args) -> str:
        """`sbatch --parsable <args>` (options, then a script path or `--wrap CMD`); returns the job
        id. Unless the args say otherwise the job runs in `jobs_dir` and writes
        `jobs_dir/slurm-<id>.out`."""
        args = [str(a) for a in args]
        defaults = []
        if not any(a in ("-D", "--chdir") or a.startswith("--chdir=") for a in args):
            defaults.append(f"--chdir={self.jobs_dir}")
        if not any(a in ("-o", "--output") or a.startswith("--output=") for a in args):
            defaults.append(f"--output={self.jobs_dir}/slurm-%j.out")
        out = self.run("sbatch", "--parsable", *defaults, *args).strip()
        return out.split(";")[0]  # `<id>` or `<id>;<cluster>`

    def output_of(self, job_id: str) -> Path:
        """Where a job submitted with sbatch()'s default --output writes."""
        return self.jobs_dir / f"slurm-{job_id}.out"

    def squeue_jobs(self, name: str | None = None) -> list[dict]:
        """Jobs squeue shows (pending, running, completing): dicts with id, name, state
        (PENDING, RUNNING, …) and node ("" while pending)."""
        args = ["squeue", "--noheader", "--array", "--format", "%i|%j|%T|%N"]  # array tasks one per line
        if name is not None:
            args += ["--name", name]
        jobs = []
        for line in self.run(*args).splitlines():
            if line.strip():
                job_id, job_name, state, node = line.strip().split("|", 3)
                jobs.append({"id": job_id, "name": job_name, "state": state, "node": node})
        return jobs

    def job(self, job_id: str) -> dict | None:
        return next((job for job in self.squeue_jobs() if job["id"] == str(job_id)), None)

    def job_node(self, job_id: str) -> str | None:
        """The node a job runs on; None while it is pending or once squeue no longer shows it."""
        job = self.job(job_id)
        return (job["node"] or None) if job else None

    def scontrol_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, …); Slurm keeps a finished
        job there for MinJobAge (300 s)."""
        fields = {}
        for token in self.run("scontrol", "show", "job", "--oneliner", job_id).split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def cancel_all_jobs(self, timeout: float | None = None):
        """Cancels every job and waits until squeue shows none; what a test ends with. A job that
        ignores SIGTERM takes KillWait seconds to go (`scancel --signal=KILL` is no shortcut:
        Slurm treats it as a plain cancel, SIGTERM first)."""
        jobs = self.squeue_jobs()
        if jobs:
            self._run_quietly("scancel", *[job["id"] for job in jobs])
            self.wait_jobs_gone(timeout if timeout is not None else self.kill_wait + 15)

    # -- waiting ------------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], T], timeout: float, what: str | Callable[[], str],
                 interval: float = 0.1) -> T:
        """Calls `predicate` until it returns something truthy and returns that. Fails the test with
        the daemon logs when `timeout` passes or a daemon dies first. `what` says what was awaited
        (a callable gives a message with the latest state)."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [d for d in self.daemons if not d.alive()]
            if dead:
                pytest.fail(f"{', '.join(d.name for d in dead)} died while waiting for "
                            f"{what() if callable(what) else what}\n{self.logs()}", pytrace=False)
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}\n"
                            f"{self.logs()}", pytrace=False)
            time.sleep(interval)

    def wait_job_running(self, job_id: str, timeout: float = 15) -> str:
        """Waits until the job runs; returns its node."""
        return self.wait_for(lambda: (self.job(job_id) or {}).get("state") == "RUNNING" and self.job_node(job_id),
                             timeout, lambda: f"job {job_id} running (squeue: {self.squeue_jobs()})")

    def wait_job_gone(self, job_id: str, timeout: float = 15):
        self.wait_for(lambda: self.job(job_id) is None, timeout,
                      lambda: f"job {job_id} to leave squeue (squeue: {self.squeue_jobs()})")

    def wait_jobs_gone(self, timeout: float = 15):
        self.wait_for(lambda: not self.squeue_jobs(), timeout,
                      lambda: f"every job to leave squeue (squeue: {self.squeue_jobs()})")

    # -- diagnostics --------------------------------------------------------------------------

    def logs(self, lines: int = 30) -> str:
        """Tails of every daemon's log, for failure messages."""
        if not self.daemons:
            return f"(no Slurm daemon was started; files in {self.workdir})"
        return "\n\n".join(d.tail(lines) for d in self.daemons) + f"\n\n(full logs in {self.log_dir})"

    # -- internals ----------------------------------------------------------------------------

    def _daemon(self, name: str) -> _Daemon | None:
        return next((d for d in self.daemons if d.name == name), None)

    def _start(self, name: str, cmd: list[str], log: Path | None) -> _Daemon:
        daemon = _Daemon(name, cmd, self.env, self.workdir, self.log_dir / f"{name}.out", log)
        self.daemons.append(daemon)
        return daemon

    @property
    def munge_socket(self) -> Path:
        return self._socket_dir / "munge.sock"

    def _write_files(self):
        for path in (self.conf_dir, self.log_dir, self.state_dir, self.dev_dir, self.jobs_dir,
                     self.workdir / "munge"):
            path.mkdir(parents=True, exist_ok=True)
        # Sockets live in the workdir unless its path is too long for them.
        if len(str(self.workdir)) <= MAX_SOCKET_DIR_CHARS:
            self._socket_dir = self.workdir / "run"
            self._socket_dir.mkdir(exist_ok=True)
        else:
            self._socket_dir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
            self._own_socket_dir = True
        (self._socket_dir / "spool").mkdir(exist_ok=True)
        for node in self.nodes:
            for index in range(node.gpus):
                device = self._gpu_device(node, index)
                if not device.exists():
                    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a stand-in for /dev/nvidia<index>
        key = self.workdir / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        (self.conf_dir / "plugstack.conf").write_text("")  # not the machine's /etc/slurm/plugstack.conf
        (self.conf_dir / "gres.conf").write_text(self._gres_conf())
        self.conf_path.write_text(self._slurm_conf())

    def _gpu_device(self, node: Node, index: int) -> Path:
        return self.dev_dir / f"{node.name}-gpu{index}"

    def _slurm_conf(self) -> str:
        host = socket.gethostname().split(".")[0]
        run = self._socket_dir
        conf = {
            "ClusterName": f"lathe{secrets.token_hex(3)}",
            "SlurmctldHost": f"{host}(127.0.0.1)",
            "SlurmctldPort": str(free_port()),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": str(self.state_dir),
            # %n is the node name: each slurmd of MULTIPLE_SLURMD gets its own files.
            "SlurmdSpoolDir": f"{run}/spool/%n",
            "SlurmctldPidFile": f"{run}/slurmctld.pid",
            "SlurmdPidFile": f"{run}/slurmd-%n.pid",
            "SlurmctldLogFile": str(self.log_dir / "slurmctld.log"),
            "SlurmdLogFile": str(self.log_dir / "slurmd-%n.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            # Cores only: memory is not a consumable, so jobs need no --mem.
            "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill",
            # batch_sched_delay=0: consider a batch job at the next 1 s tick, not up to 3 s later
            # (the default batches submissions on busy clusters). bf_interval=1: backfill every
            # second, not every 30: the main scheduler stops at the first job of a partition
            # that cannot start, so a pilot pending for an a100 would hold back an h100 one
            # until backfill looks further down the queue.
            "SchedulerParameters": "batch_sched_delay=0,bf_interval=1",
            "SlurmdParameters": "config_overrides",
            "GresTypes": "gpu",
            "PlugStackConfig": str(self.conf_dir / "plugstack.conf"),
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "MpiDefault": "none",
            "ReturnToService": "2",
            "MessageTimeout": "5",
            "KillWait": str(self.kill_wait),
            "InactiveLimit": "0",
        }
        conf.update(self.extra_conf)
        lines = [f"{key}={value}" for key, value in conf.items()]
        for node in self.nodes:
            line = (f"NodeName={node.name} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                    f"CPUs={node.cpus} RealMemory={node.memory_mb} State=UNKNOWN")
            if node.features:
                line += f" Features={','.join(node.features)}"
            if node.gpus:
                line += f" Gres=gpu:{node.gpus}"
            lines.append(line)
        lines.append("PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _gres_conf(self) -> str:
        lines = ["AutoDetect=off"]
        for node in self.nodes:
            lines += [f"NodeName={node.name} Name=gpu File={self._gpu_device(node, i)}" for i in range(node.gpus)]
        return "\n".join(lines) + "\n"

    def _start_munged(self, timeout: float):
        munge_dir = self.workdir / "munge"
        # --force: munged wants every directory above its socket searchable by all users, and
        # pytest's temp dirs are 0700; only this cluster's root processes use the socket. In the
        # foreground munged logs to its stderr, not to a log file.
        self._start("munged", [find_tool("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--seed-file={munge_dir / 'munged.seed'}"], log=None)

        def answers():
            probe = subprocess.run([find_tool("munge"), "--no-input", f"--socket={self.munge_socket}"],
                                   capture_output=True, timeout=10)
            return probe.returncode == 0

        self.wait_for(lambda: self.munge_socket.exists() and answers(), timeout, "munged to answer on its socket")

    def _start_slurmctld(self, timeout: float):
        self._start("slurmctld", [find_tool("slurmctld"), "-D", "-i", "-f", str(self.conf_path)],
                    self.log_dir / "slurmctld.log")

        def answers():
            try:
                return "UP" in self.run("scontrol", "ping", timeout=10)
            except SlurmCommandError:
                return False

        self.wait_for(answers, timeout, "slurmctld to answer `scontrol ping`")

    def _all_nodes_idle(self) -> bool:
        states = dict(line.split() for line in self.run("sinfo", "--Node", "--noheader", "--format", "%N %T")
                      .splitlines() if line.strip())
        return all(states.get(node.name) == "idle" for node in self.nodes)

    def _run_warmup_jobs(self, timeout: float):
        """Runs one empty job per node and waits until they are done (~1 s): every slurmd can
        launch a job (job credential, slurmstepd, spool) before a test counts on it."""
        warmups = [self.sbatch(f"--nodelist={node.name}", "--job-name=slurm-cluster-warmup", "--output=/dev/null",
                               "--wrap", "true") for node in self.nodes]
        self.wait_for(lambda: not any(job["id"] in warmups for job in self.squeue_jobs()), timeout,
                      lambda: f"the warm-up jobs to finish (squeue: {self.squeue_jobs()})")
        states = {job_id: self.scontrol_job(job_id).get("JobState") for job_id in warmups}
        if any(state != "COMPLETED" for state in states.values()):
            pytest.fail(f"warm-up jobs did not complete: {states}\n{self.logs()}", pytrace=False)

    def _run_quietly(self, *args):
        try:
            self.run(*args)
        except SlurmCommandError:
            pass  # a job that ended meanwhile

    def _kill_strays(self) -> list[str]:
        """SIGKILLs processes that carry this cluster's SLURM_CONF (slurmstepd, job processes: all
        started through this cluster's slurmd) and their descendants; returns those that outlive
        a few seconds."""
        marker = f"\0SLURM_CONF={self.conf_path}\0".encode()
        parents = _parent_pids()
        ours = {pid for pid in parents if pid != os.getpid() and marker in b"\0" + _environ(pid)}
        frontier = set(ours)
        while frontier:  # descendants too, whatever environment they were given
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier and pid not in ours}
            ours |= frontier
        for pid in ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(pid) for pid in ours):
            time.sleep(0.05)
        return [f"{pid} {_cmdline(pid)}" for pid in ours if _running(pid)]


# ---------------------------------------------------------------------------------------------
# /proc


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # `pid (comm) state ppid …`: comm may hold spaces and parentheses, so split after the last ')'.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie waits only for its parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
