"""Launchers (local pool, SLURM through submitit, dry run) and the state of a launched job.

Every launcher is a plain function ``launcher(tasks, options) -> {job_id: outcome}`` where
``outcome`` is one of ``done``, ``failed`` (local, slurm with ``wait``), ``submitted`` (slurm), ``printed`` (dry run).
Launchers never decide which jobs to run: the sweep hands them the ones that are neither
done nor running.

Each job directory (= train's ``--output_dir``) gets two files besides train's own:

- ``train.log``: everything the run printed, one ``=== attempt`` header per (re)start;
- ``launch.json``: how it was launched (``launcher``, ``slurm_job_id``, log paths) and the
  exit status of its last attempt (``returncode``, ``null`` while it runs).

A job's state (:func:`job_state`) comes from train's files first (``done``, the run lock),
then from the SLURM queue (``squeue``, never ``sacct``: accounting may be absent), then from
``launch.json``; so a cancelled, killed or out-of-memory SLURM job is reported failed as soon
as it leaves the queue's active states.
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import submitit
from tqdm import tqdm

from domainbed_sil import run_files
from domainbed_sil.cpus import available_cores
from domainbed_sil.jobs import Job, array_chunks

LOG = "train.log"
LAUNCH_RECORD = "launch.json"
SLURM_LOGS = "slurm_logs"

DONE, RUNNING, FAILED, INCOMPLETE, NOT_LAUNCHED = "done", "running", "failed", "incomplete", "not launched"
CATEGORIES = (DONE, RUNNING, FAILED, INCOMPLETE, NOT_LAUNCHED)

# squeue states in which a job may still run (or run again); any other state, or absence from
# the queue, means the job is over.
SLURM_ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's default MaxArraySize


class LaunchError(RuntimeError):
    """A launch that cannot proceed (bad launcher options, sbatch refused); one-line message."""


@dataclass(frozen=True)
class Task:
    """A job handed to a launcher: where it runs and the train arguments (threads excluded)."""

    job: Job
    run_dir: Path
    argv: List[str]


@dataclass
class LaunchOptions:
    """Options of every launcher; each reads the ones it needs."""

    sweep_dir: Path
    threads: Optional[int] = None          # torch threads per job (local: default 1; slurm: --slurm_cpus)
    max_parallel: Optional[int] = None     # local: concurrent jobs (default: cores // threads)
    slurm_partition: Optional[str] = None
    slurm_account: Optional[str] = None
    slurm_qos: Optional[str] = None
    slurm_time: str = "60"                 # minutes, or any sbatch --time value
    slurm_cpus: int = 1
    slurm_gpus: int = 0
    slurm_mem: Optional[str] = None        # sbatch --mem value, e.g. 16G
    slurm_array_parallelism: int = 256
    slurm_max_array_size: Optional[int] = None  # default: the cluster's MaxArraySize
    slurm_max_requeues: int = 20           # time-outs a job may be requeued after
    wait: bool = False                     # slurm: block until every job is done or failed
    poll_s: float = 5.0                    # slurm --wait: seconds between squeue polls


@dataclass
class JobState:
    """Where a job stands; ``log_tail`` holds the last log lines of a failed job."""

    category: str
    detail: str = ""
    log_tail: List[str] = field(default_factory=list)
    # True when the state could not be established (squeue unavailable): never delete such a job
    uncertain: bool = False


# --- launch records and logs ----------------------------------------------------------------

def read_launch_record(run_dir: Path) -> Dict[str, Any]:
    path = Path(run_dir) / LAUNCH_RECORD
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def update_launch_record(run_dir: Path, **fields: Any) -> None:
    record = {**read_launch_record(run_dir), **fields}
    run_files.atomic_write_bytes(Path(run_dir) / LAUNCH_RECORD, (json.dumps(record, sort_keys=True) + "\n").encode())


def write_launch_record(run_dir: Path, **fields: Any) -> None:
    """A fresh record (a new launch forgets the previous one's exit status)."""
    run_files.atomic_write_bytes(Path(run_dir) / LAUNCH_RECORD, (json.dumps(fields, sort_keys=True) + "\n").encode())


def log_tail(path: Path, n: int = 6) -> List[str]:
    """The last ``n`` non-blank lines of a log (progress-bar redraws split at carriage returns)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    lines = [line.rstrip() for chunk in text.splitlines() for line in chunk.split("\r")]
    return [line for line in lines if line.strip()][-n:]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def attempt_header(run_dir: Path, where: str) -> str:
    """The ``=== attempt`` line opening each (re)start in ``train.log``."""
    records = run_files.read_records(run_dir)
    if (run_dir / run_files.CHECKPOINT).exists():
        how = f"resuming from {run_files.CHECKPOINT} (records up to step {records[-1]['step'] if records else '-'})"
    else:
        how = "starting from scratch"
    return f"=== attempt {_now()} on {socket.gethostname()} ({where}): {how}"


def _progress(run_dir: Path, job: Job) -> str:
    records = run_files.read_records(run_dir)
    if not records:
        return "no records yet"
    last = records[-1]
    return f"step {last.get('step')}/{last.get('args', {}).get('steps', job.steps)}"


# --- job state --------------------------------------------------------------------------------

def job_state(job: Job, run_dir: Path, queue: Optional[Mapping[str, str]]) -> JobState:
    """Classify one job; ``queue`` maps SLURM job ids to squeue states (None: squeue unavailable)."""
    run_dir = Path(run_dir)
    if run_files.is_done(run_dir):
        return JobState(DONE)
    if not run_dir.exists():
        return JobState(NOT_LAUNCHED)
    record = read_launch_record(run_dir)
    where = _where(record)
    if run_files.is_locked(run_dir):
        return JobState(RUNNING, f"{where}, {_progress(run_dir, job)}")
    returncode = record.get("returncode")
    if record.get("launcher") == "slurm" and returncode is None:
        slurm_id = str(record.get("slurm_job_id"))
        if queue is None:
            return JobState(INCOMPLETE, f"{where}: squeue unavailable, state unknown", uncertain=True)
        state = queue.get(slurm_id)
        if state in SLURM_ACTIVE_STATES:
            return JobState(RUNNING, f"{where} {state}, {_progress(run_dir, job)}")
        reason = f"ended {state}" if state else "left the queue"
        return JobState(FAILED, f"{where} {reason} without finishing ({_progress(run_dir, job)})", _failure_tail(run_dir, record))
    if returncode not in (None, 0):
        return JobState(FAILED, f"{where} exited with status {returncode} ({_progress(run_dir, job)})", _failure_tail(run_dir, record))
    if record.get("launcher") == "local" and returncode is None and _local_train_alive(record, run_dir):
        # train takes the run lock only after loading the data; until then its process is the sign
        return JobState(RUNNING, f"{where}, starting (pid {record['pid']}), {_progress(run_dir, job)}")
    return JobState(INCOMPLETE, f"{where}, {_progress(run_dir, job)}" if record else _progress(run_dir, job))


def _local_train_alive(record: Mapping[str, Any], run_dir: Path) -> bool:
    """True when the record's pid is a live ``domainbed_sil.train`` process of ``run_dir`` on this host.

    The command line is checked (where /proc exists) so that a pid reused by another process,
    even another job's training, does not keep a dead job "running".  Without procfs (macOS)
    the pid alone is trusted.
    """
    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("host") != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except OSError:  # gone, or owned by another user: not our job
        return False
    if not Path("/proc").is_dir():
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # exited between the two checks
        return False
    job_dir = Path(run_dir).name.encode()  # the job id; the path itself may be given relative or absolute
    return b"domainbed_sil.train" in cmdline and any(arg.rstrip(b"/").rsplit(b"/", 1)[-1] == job_dir for arg in cmdline)


def _where(record: Mapping[str, Any]) -> str:
    if record.get("launcher") == "slurm":
        return f"slurm job {record.get('slurm_job_id')}"
    if record.get("launcher"):
        return f"{record['launcher']} on {record.get('host', '?')}"
    return "unknown launcher"


def _failure_tail(run_dir: Path, record: Mapping[str, Any]) -> List[str]:
    tail = log_tail(run_dir / LOG)
    # a SLURM job killed before train started leaves its story in submitit's log only
    if record.get("stderr") and not any(not line.startswith("===") for line in tail):
        tail = [f"({record['stderr']})"] + log_tail(Path(record["stderr"]))
    return tail


def squeue_states(timeout_s: float = 30.0) -> Optional[Dict[str, str]]:
    """``{job_id: state}`` for this user's jobs known to slurmctld (array tasks as ``A_i``).

    Terminal states stay visible for the cluster's MinJobAge; later a job is simply absent.
    None when squeue is missing or fails (the caller must then not guess).
    """
    cmd = ["squeue", "-h", "-r", "-t", "all", "-u", getpass.getuser(), "-o", "%i|%T"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id:
            states[job_id] = state.split()[0] if state else ""
    return states


def slurm_max_array_size() -> int:
    """The cluster's MaxArraySize from ``scontrol show config`` (SLURM's default when unreadable)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY_SIZE
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize":
            try:
                return int(value.strip())
            except ValueError:
                break
    return DEFAULT_MAX_ARRAY_SIZE


# --- local --------------------------------------------------------------------------------------

def local_parallelism(cores: int, threads: Optional[int], max_parallel: Optional[int]) -> tuple:
    """(jobs at once, threads per job) with jobs x threads <= cores; LaunchError if impossible."""
    threads = threads or 1
    if threads < 1 or threads > cores:
        raise LaunchError(f"--threads must be between 1 and the {cores} available cores, got {threads}")
    if max_parallel is not None and max_parallel < 1:
        raise LaunchError(f"--max_parallel must be a positive integer, got {max_parallel}")
    limit = cores // threads
    return min(max_parallel or limit, limit), threads


def local(tasks: Sequence[Task], options: LaunchOptions) -> Dict[str, str]:
    """Run the jobs as subprocesses on this machine, ``max_parallel`` at a time.

    Each job's output goes to ``<run_dir>/train.log``; a failing job is reported (with the
    tail of its log) and the others go on.  Ctrl-C stops the running jobs, which stay
    resumable.
    """
    parallel, threads = local_parallelism(available_cores(), options.threads, options.max_parallel)
    if options.max_parallel and options.max_parallel > parallel:
        print(f"note: running {parallel} jobs at once, not {options.max_parallel}: "
              f"{parallel} x {threads} thread(s) fill the {available_cores()} cores", file=sys.stderr)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending = deque(tasks)
    running: Dict[str, tuple] = {}
    outcomes: Dict[str, str] = {}
    bar = tqdm(total=len(tasks), unit="job", desc="jobs", disable=None, dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                task = pending.popleft()
                running[task.job.job_id] = (task, _start_local(task, threads, env), time.monotonic())
            time.sleep(0.2)
            for job_id, (task, proc, started) in list(running.items()):
                returncode = proc.poll()
                if returncode is None:
                    continue
                del running[job_id]
                update_launch_record(task.run_dir, returncode=returncode, ended=_now())
                outcomes[job_id] = DONE if returncode == 0 else FAILED
                bar.update(1)
                n = len(outcomes)
                took = time.monotonic() - started
                if returncode == 0:
                    tqdm.write(f"[{n}/{len(tasks)}] done   {job_id} {task.job.label()} ({took:.0f} s)")
                else:
                    lines = "\n".join(f"      | {line}" for line in log_tail(task.run_dir / LOG))
                    tqdm.write(f"[{n}/{len(tasks)}] FAILED {job_id} {task.job.label()} (exit {returncode}, "
                               f"log {task.run_dir / LOG})\n{lines}")
    finally:
        for task, proc, _ in running.values():  # only on Ctrl-C or an error here
            proc.terminate()
        for task, proc, _ in running.values():
            proc.wait()
        bar.close()
    return outcomes


def _start_local(task: Task, threads: int, env: Mapping[str, str]) -> subprocess.Popen:
    task.run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "domainbed_sil.train", *task.argv, "--threads", str(threads)]
    with open(task.run_dir / LOG, "a") as log:
        log.write(attempt_header(task.run_dir, "local") + "\n$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env))
    write_launch_record(task.run_dir, launcher="local", host=socket.gethostname(), pid=proc.pid,
                        started=_now(), returncode=None)
    return proc


# --- dry run ------------------------------------------------------------------------------------

def dry_run(tasks: Sequence[Task], options: LaunchOptions) -> Dict[str, str]:
    """Print the command each job would run; touch nothing."""
    for task in tasks:
        print(f"{task.job.job_id}  {task.job.label()}\n    python -m domainbed_sil.train {shlex.join(task.argv)}")
    return {task.job.job_id: "printed" for task in tasks}


# --- SLURM --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C code too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(path, "ab", buffering=0) as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


class SlurmTrainJob(submitit.helpers.Checkpointable):
    """The callable a SLURM array task runs: ``train.main(argv)``, output to ``<run_dir>/train.log``.

    Checkpointable: on preemption or time-out submitit calls ``checkpoint()``, which (by the
    base class) resubmits this same callable, and requeues the job; the restarted
    ``train.main`` resumes from the run's ``checkpoint.pt``.
    """

    def __init__(self, argv: Sequence[str], run_dir: Path):
        self.argv = list(argv)
        self.run_dir = str(run_dir)

    def __call__(self) -> int:
        from domainbed_sil.train import main as train_main  # torch is imported on the node only

        run_dir = Path(self.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        job_id = _slurm_job_id_from_env()
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        update_launch_record(run_dir, returncode=None, attempt_started=_now(), restart_count=int(restarts))
        with _output_to(run_dir / LOG):
            print(attempt_header(run_dir, f"slurm job {job_id}, restart {restarts}"), flush=True)
            try:
                returncode = train_main(self.argv)
            except Exception:  # noqa: BLE001 - the traceback must reach train.log; SystemExit passes
                traceback.print_exc()
                returncode = 1
        update_launch_record(run_dir, returncode=returncode, ended=_now())
        if returncode != 0:
            raise RuntimeError(f"train exited with status {returncode}; see {run_dir / LOG}")
        return returncode


def _slurm_job_id_from_env() -> str:
    array_id, task_id = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task_id:
        return f"{array_id}_{task_id}"
    return os.environ.get("SLURM_JOB_ID", "?")


def slurm_minutes(text: str) -> int:
    """sbatch ``--time`` syntax -> whole minutes (rounded up): ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``.

    submitit needs minutes as a number: it computes when a job has timed out from them.
    """
    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        raise LaunchError(f"--slurm_time expects minutes or sbatch's time syntax (M, H:M:S, D-H:M:S), got {text!r}")
    days, fields = match.group(1), [int(v) for v in match.groups()[1:] if v is not None]
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = int(days) * 86400 + sum(v * u for v, u in zip(fields, (3600, 60, 1)))
    else:  # M, M:S, H:M:S
        seconds = sum(v * u for v, u in zip(fields, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(fields)]))
    if seconds <= 0:
        raise LaunchError(f"--slurm_time must be positive, got {text!r}")
    return -(-seconds // 60)


def slurm_parameters(options: LaunchOptions) -> Dict[str, Any]:
    """submitit SlurmExecutor parameters from the launcher flags (unset flags are left out)."""
    params: Dict[str, Any] = {
        "job_name": "domainbed_sil", "time": slurm_minutes(options.slurm_time), "cpus_per_task": options.slurm_cpus,
        "array_parallelism": options.slurm_array_parallelism,
    }
    optional = {"partition": options.slurm_partition, "account": options.slurm_account,
                "qos": options.slurm_qos, "mem": options.slurm_mem,
                "gpus_per_node": options.slurm_gpus or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def slurm(tasks: Sequence[Task], options: LaunchOptions) -> Dict[str, str]:
    """Submit the jobs as SLURM job arrays (split at MaxArraySize); logs in ``<sweep>/slurm_logs``.

    Returns right after submission unless ``options.wait``: then polls ``squeue`` and the runs'
    files until every job is done or failed (see :func:`wait_slurm`).
    """
    if shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: the slurm launcher needs a SLURM client "
                          "(for a local test cluster see scripts/start_slurm.sh)")
    if options.slurm_cpus < 1 or options.slurm_array_parallelism < 1:
        raise LaunchError("--slurm_cpus and --slurm_array_parallelism must be positive integers")
    executor = submitit.SlurmExecutor(folder=Path(options.sweep_dir) / SLURM_LOGS / "%j",
                                      max_num_timeout=options.slurm_max_requeues)
    try:
        executor.update_parameters(**slurm_parameters(options))
    except ValueError as err:
        raise LaunchError(f"submitit rejected the SLURM parameters: {err}") from err
    max_size = options.slurm_max_array_size or slurm_max_array_size()
    threads = options.threads or options.slurm_cpus
    for chunk in array_chunks(list(tasks), max_size):
        for task in chunk:
            task.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with executor.batch():
                submitted = [executor.submit(SlurmTrainJob([*t.argv, "--threads", str(threads)], t.run_dir)) for t in chunk]
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError, OSError) as err:
            raise LaunchError(f"sbatch failed: {_one_line(err)}") from err
        for task, job in zip(chunk, submitted):
            write_launch_record(task.run_dir, launcher="slurm", slurm_job_id=str(job.job_id), submitted=_now(),
                                stdout=str(job.paths.stdout), stderr=str(job.paths.stderr), returncode=None)
        print(f"submitted {len(chunk)} job(s) to SLURM: {submitted[0].job_id.split('_')[0]}"
              f"{' (array)' if len(chunk) > 1 else ''}; logs in {Path(options.sweep_dir) / SLURM_LOGS}")
    if not options.wait:
        return {task.job.job_id: "submitted" for task in tasks}
    return wait_slurm(tasks, options.poll_s)


def _one_line(err: BaseException) -> str:
    text = getattr(err, "stderr", None) or getattr(err, "output", None) or str(err)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return " ".join(str(text).split())[:500]


def wait_slurm(tasks: Sequence[Task], poll_s: float = 5.0, max_unknown_polls: int = 12,
               queue_fn: Callable[[], Optional[Dict[str, str]]] = squeue_states) -> Dict[str, str]:
    """Poll until every task is done or failed; each failure is printed with its log tail.

    Bounded: a job leaves SLURM's active states within KillWait of being cancelled, killed or
    running out of memory, and is then failed at the next poll.  If squeue keeps failing for
    ``max_unknown_polls`` polls in a row, raise LaunchError rather than wait forever.
    """
    outcomes: Dict[str, str] = {}
    unknown = 0
    bar = tqdm(total=len(tasks), unit="job", desc="slurm jobs", disable=None, dynamic_ncols=True)
    try:
        while len(outcomes) < len(tasks):
            queue = queue_fn()
            if queue is None:
                unknown += 1
                if unknown >= max_unknown_polls:
                    raise LaunchError(f"squeue failed {unknown} times in a row; check the cluster, then run `status`")
            else:
                unknown = 0
                for task in tasks:
                    if task.job.job_id in outcomes:
                        continue
                    state = job_state(task.job, task.run_dir, queue)
                    if state.category in (DONE, FAILED):
                        outcomes[task.job.job_id] = state.category
                        bar.update(1)
                        if state.category == DONE:
                            tqdm.write(f"done   {task.job.job_id} {task.job.label()}")
                        else:
                            lines = "\n".join(f"      | {line}" for line in state.log_tail)
                            tqdm.write(f"FAILED {task.job.job_id} {task.job.label()}: {state.detail}\n{lines}")
            if len(outcomes) < len(tasks):
                time.sleep(poll_s)
    finally:
        bar.close()
    return outcomes


LAUNCHERS: Dict[str, Callable[[Sequence[Task], LaunchOptions], Dict[str, str]]] = {
    "local": local,
    "slurm": slurm,
    "dry_run": dry_run,
}
