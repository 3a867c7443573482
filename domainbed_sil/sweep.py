"""Sweeps: ``python -m domainbed_sil.sweep {launch,status,delete_incomplete}``.

A sweep is a set of jobs (see :mod:`domainbed_sil.jobs`) given by a spec file
(``--sweep sweeps/NAME.json``) and/or flags, which override the spec.  Each job runs in
``<output_dir>/<job id>``.  ``launch`` skips done and running jobs and resumes the others;
``status`` sorts jobs into done / running / failed / incomplete / not launched;
``delete_incomplete`` removes failed and incomplete job directories, never a running one.
A launch holds ``<output_dir>/.sweep.lock``: a second launch into the same directory at the
same time is refused (exit 3), as is ``delete_incomplete`` during a launch.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from domainbed_sil import run_files
from domainbed_sil.allocator import MALLOC_VARIABLE, check_malloc_setting
from domainbed_sil.hparams import parse_overrides
from domainbed_sil.jobs import Job, SpecError, expand, load_spec, parse_test_envs_cli
from domainbed_sil.launchers import (
    CATEGORIES, DONE, FAILED, INCOMPLETE, LAUNCHERS, RUNNING, JobState, LaunchError,
    LaunchOptions, Task, job_state, read_launch_record, squeue_states,
)

SWEEP_LOCK = ".sweep.lock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3


class SweepBusy(RuntimeError):
    """Another launch holds the sweep directory."""


def SweepLock(output_dir: Path) -> run_files.FileLock:
    """The lock a launch holds on ``<output_dir>/.sweep.lock``."""
    return run_files.FileLock(
        Path(output_dir) / SWEEP_LOCK,
        lambda path, pid: SweepBusy(f"another launch is running in {path.parent} (pid {pid}); "
                                    "wait for it to finish or stop it, then retry"),
    )


def launch_in_progress(output_dir: Path) -> bool:
    """True while some process holds the sweep lock of ``output_dir``."""
    return run_files.is_file_locked(Path(output_dir) / SWEEP_LOCK)


# --- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m domainbed_sil.sweep", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["launch", "status", "delete_incomplete"])
    s = p.add_argument_group("the sweep (flags override the spec file)")
    s.add_argument("--sweep", default=None, help="spec file, e.g. sweeps/table1_cmnist_flip.json")
    s.add_argument("--datasets", nargs="+", default=None)
    s.add_argument("--algorithms", nargs="+", default=None,
                   help="algorithms; with a spec that has rows: keep the rows with these names or algorithms")
    s.add_argument("--test_envs", nargs="+", default=None,
                   help="test env sets, each comma-separated: '2' or '0 1 2' (one job each) or '0,1'; "
                        "'all' = every single env; default: each dataset's default")
    s.add_argument("--n_hparams", type=int, default=None, help="hparams seeds 0..N-1 (0 = defaults; default 1)")
    s.add_argument("--n_trials", type=int, default=None, help="trial seeds 0..N-1 (default 1)")
    s.add_argument("--steps", type=int, default=None, help="default: the spec's, else the dataset's")
    s.add_argument("--checkpoint_freq", type=int, default=None, help="default: the spec's, else the dataset's")
    s.add_argument("--holdout_fraction", type=float, default=None, help="default: the spec's, else the dataset's")
    s.add_argument("--hparams", default=None, help="JSON object merged over every row's hparams")
    s.add_argument("--output_dir", default="sweep_output", help="sweep directory (default ./sweep_output)")
    s.add_argument("--data_dir", default=None, help="default: $DOMAINBED_SIL_DATA, else ./data")
    s.add_argument("--skip_model_save", action="store_true", help="do not keep model.pt of finished jobs")
    l = p.add_argument_group("launching")
    l.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local")
    l.add_argument("--dry_run", action="store_true",
                   help="launch: print the commands; delete_incomplete: print what would be removed")
    l.add_argument("--max_parallel", type=int, default=None, help="local: jobs at once (default cores // threads)")
    l.add_argument("--threads", type=int, default=None,
                   help="torch threads per job (local default 1; slurm default --slurm_cpus)")
    l.add_argument("--slurm_partition", default=None)
    l.add_argument("--slurm_account", default=None)
    l.add_argument("--slurm_qos", default=None)
    l.add_argument("--slurm_time", default="60", help="time limit per job: minutes or sbatch's D-HH:MM:SS (default 60)")
    l.add_argument("--slurm_cpus", type=int, default=1, help="CPUs per job (default 1)")
    l.add_argument("--slurm_gpus", type=int, default=0, help="GPUs per job (default 0)")
    l.add_argument("--slurm_mem", default=None, help="memory per job, sbatch --mem syntax, e.g. 16G")
    l.add_argument("--slurm_array_parallelism", type=int, default=256, help="array tasks running at once (default 256)")
    l.add_argument("--slurm_max_array_size", type=int, default=None,
                   help="split arrays at this size (default: the cluster's MaxArraySize)")
    l.add_argument("--wait", action="store_true", help="slurm: wait until every job is done or failed")
    l.add_argument("--poll_s", type=float, default=5.0, help="slurm --wait: seconds between squeue polls")
    o = p.add_argument_group("status / delete_incomplete")
    o.add_argument("--brief", action="store_true", help="status: counts and the jobs that are not done only")
    o.add_argument("--yes", action="store_true", help="delete_incomplete: do not ask for confirmation")
    return p


def sweep_jobs(args: argparse.Namespace) -> List[Job]:
    """The jobs of the sweep described by the spec file and the flags (SpecError on bad input)."""
    spec: Dict[str, Any] = {}
    if args.sweep:
        path = Path(args.sweep)
        if not path.is_file():
            raise SpecError(f"sweep spec {path} not found; expected a JSON file like sweeps/quick_smoke.json")
        spec = load_spec(path.read_text(), str(path))
    try:
        hparams = parse_overrides(args.hparams) if args.hparams else None
    except ValueError as err:
        raise SpecError(str(err)) from err
    for flag in ("n_hparams", "n_trials", "steps", "checkpoint_freq"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SpecError(f"--{flag} must be a positive integer, got {value}")
    cli = {
        "datasets": args.datasets, "algorithms": args.algorithms, "test_envs": parse_test_envs_cli(args.test_envs),
        "n_hparams": args.n_hparams, "n_trials": args.n_trials, "steps": args.steps,
        "checkpoint_freq": args.checkpoint_freq, "holdout_fraction": args.holdout_fraction, "hparams": hparams,
    }
    return expand(spec, cli)


def job_states(jobs: Sequence[Job], output_dir: Path) -> List[Tuple[Job, Path, JobState]]:
    """Each job with its directory and state; squeue is asked once, only if some job went to SLURM."""
    dirs = [Path(output_dir) / job.job_id for job in jobs]
    on_slurm = any(read_launch_record(d).get("launcher") == "slurm" for d in dirs if d.exists())
    queue = squeue_states() if on_slurm else {}
    return [(job, d, job_state(job, d, queue)) for job, d in zip(jobs, dirs)]


def launch(args: argparse.Namespace, jobs: Sequence[Job], output_dir: Path) -> int:
    states = job_states(jobs, output_dir)
    skip = {DONE: 0, RUNNING: 0}
    tasks, resumed = [], 0
    data_dir = str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else None
    for job, run_dir, state in states:
        if state.category in skip:
            skip[state.category] += 1
            continue
        resumed += state.category in (FAILED, INCOMPLETE)
        argv = job.train_argv(str(run_dir), data_dir, skip_model_save=args.skip_model_save)
        tasks.append(Task(job, run_dir, argv))
    launcher = "dry_run" if args.dry_run else args.launcher
    print(f"{output_dir}: {len(jobs)} jobs: {skip[DONE]} done and {skip[RUNNING]} running (skipped), "
          f"{len(tasks)} to launch with {launcher} ({resumed} resumed or retried)")
    if not tasks:
        return EXIT_OK
    options = LaunchOptions(
        sweep_dir=output_dir, threads=args.threads, max_parallel=args.max_parallel,
        slurm_partition=args.slurm_partition, slurm_account=args.slurm_account, slurm_qos=args.slurm_qos,
        slurm_time=args.slurm_time, slurm_cpus=args.slurm_cpus, slurm_gpus=args.slurm_gpus, slurm_mem=args.slurm_mem,
        slurm_array_parallelism=args.slurm_array_parallelism, slurm_max_array_size=args.slurm_max_array_size,
        wait=args.wait, poll_s=args.poll_s,
    )
    outcomes = LAUNCHERS[launcher](tasks, options)
    failed = sum(outcome == FAILED for outcome in outcomes.values())
    if launcher == "local" or args.wait:
        print(f"{sum(o == DONE for o in outcomes.values())} done, {failed} failed; "
              f"see `{args.status_command}`")
    return EXIT_FAILED if failed else EXIT_OK


def format_status(states: Sequence[Tuple[Job, Path, JobState]], output_dir: Path, brief: bool = False) -> str:
    """The status report: one count line, then the jobs of each category with details."""
    by_category: Dict[str, list] = {c: [] for c in CATEGORIES}
    for entry in states:
        by_category[entry[2].category].append(entry)
    counts = ", ".join(f"{len(by_category[c])} {c}" for c in CATEGORIES)
    lines = [f"{output_dir}: {len(states)} jobs: {counts}"]
    if launch_in_progress(output_dir):
        lines.append(f"(a launch is in progress: {Path(output_dir) / SWEEP_LOCK} is held)")
    for category in CATEGORIES:
        entries = by_category[category]
        if not entries or (brief and category == DONE):
            continue
        lines.append(f"{category}:")
        for job, _, state in entries:
            lines.append(f"  {job.job_id}  {job.label()}" + (f"  [{state.detail}]" if state.detail else ""))
            lines.extend(f"      | {line}" for line in state.log_tail)
    return "\n".join(lines)


def delete_incomplete(args: argparse.Namespace, jobs: Sequence[Job], output_dir: Path) -> int:
    """Remove failed and incomplete job directories; never a running one (its lock is taken first)."""
    states = job_states(jobs, output_dir)
    doomed = [(job, d, s) for job, d, s in states if s.category in (FAILED, INCOMPLETE) and not s.uncertain]
    uncertain = [job for job, _, s in states if s.uncertain]
    if uncertain:
        print(f"keeping {len(uncertain)} SLURM job(s) whose state is unknown (squeue unavailable)", file=sys.stderr)
    if not doomed:
        print("nothing to delete")
        return EXIT_OK
    for job, run_dir, state in doomed:
        print(f"{'would delete' if args.dry_run else 'delete'} {run_dir}  {job.label()}  ({state.category})")
    if args.dry_run:
        return EXIT_OK
    if sys.stdin.isatty() and not args.yes:
        if input(f"delete these {len(doomed)} directories? [y/N] ").strip().lower() != "y":
            print("nothing deleted")
            return EXIT_OK
    deleted = kept = 0
    for job, run_dir, _ in doomed:
        try:
            with run_files.RunLock(run_dir):  # a run that started since we looked keeps its directory
                shutil.rmtree(run_dir)
            deleted += 1
        except run_files.RunDirBusy:
            kept += 1
    print(f"deleted {deleted} job directories" + (f"; kept {kept} that started running meanwhile" if kept else ""))
    return EXIT_OK


def _check_inherited_environment() -> None:
    """SpecError for a variable that every job inherits and would fail on."""
    try:
        check_malloc_setting(os.environ.get(MALLOC_VARIABLE))
    except ValueError as err:
        raise SpecError(str(err)) from err


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; exit status 0 ok, 1 some job failed, 2 bad input, 3 a launch holds the sweep dir."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the same sweep flags find the same jobs: the hint after a launch repeats them
    args.status_command = shlex.join(["python", "-m", "domainbed_sil.sweep", "status",
                                      *[a for a in argv if a not in ("launch", "--dry_run", "--wait")]])
    try:
        jobs = sweep_jobs(args)
        if args.command == "launch":
            _check_inherited_environment()
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    output_dir = Path(args.output_dir).expanduser().resolve()
    try:
        if args.command == "status":
            print(format_status(job_states(jobs, output_dir), output_dir, args.brief))
            return EXIT_OK
        if args.dry_run and args.command == "launch":
            return launch(args, jobs, output_dir)
        with SweepLock(output_dir):
            if args.command == "launch":
                return launch(args, jobs, output_dir)
            return delete_incomplete(args, jobs, output_dir)
    except SweepBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BUSY
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; unfinished jobs are resumable: rerun the same launch", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
