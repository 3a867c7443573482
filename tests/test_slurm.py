"""The slurm launcher on a real one-node SLURM cluster (scripts/start_slurm.sh), through submitit.

Skipped only when ``sbatch`` is not installed; when it is, a cluster must answer (CI starts one).
"""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import pytest

from domainbed_sil import run_files, sweep
from domainbed_sil.launchers import FAILED, DONE, LOG, RUNNING, JobState, read_launch_record, update_launch_record

pytestmark = pytest.mark.skipif(
    shutil.which("sbatch") is None,
    reason="sbatch not found: install slurm-wlm and munge and run scripts/start_slurm.sh to run the SLURM tests",
)

CANCEL_REPORTED_WITHIN_S = 30  # KillWait (5 s on the test cluster) + a few polls


@pytest.fixture(scope="module", autouse=True)
def cluster():
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        pytest.fail(f"sbatch is installed but no SLURM node is up (sinfo: {out.stdout.strip() or out.stderr.strip()}); "
                    "start the test cluster with scripts/start_slurm.sh")


def make_sweep(tmp_path: Path, data_dir: Path, rows, steps: int, freq: int):
    """(argv prefix for sweep.main, {row name: run dir}) of a Colored MNIST sweep with a tiny MLP."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"datasets": ["ColoredMNIST"], "steps": steps, "checkpoint_freq": freq,
                                "hparams": {"hidden_dim": 8}, "rows": rows}))
    out = tmp_path / "out"
    argv = ["--sweep", str(spec), "--output_dir", str(out), "--data_dir", str(data_dir)]
    jobs = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", *argv]))
    return argv, {job.name: out / job.job_id for job in jobs}


def states(argv) -> Dict[str, JobState]:
    args = sweep.build_parser().parse_args(["status", *argv])
    out = Path(args.output_dir).resolve()
    return {job.name: state for job, _, state in sweep.job_states(sweep.sweep_jobs(args), out)}


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds it took for ``condition()`` to hold; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - start


def slurm_id(run_dir: Path) -> str:
    return read_launch_record(run_dir)["slurm_job_id"]


def test_concurrent_launches_submit_each_job_once_and_jobs_finish_or_fail_with_their_log(tmp_path, data_dir):
    rows = [{"algorithm": "ERM"}, {"name": "broken", "algorithm": "ERM", "hparams": {"hidden_dim": -1}}]
    argv, dirs = make_sweep(tmp_path, data_dir, rows, steps=5, freq=2)
    cmd = [sys.executable, "-m", "domainbed_sil.sweep", "launch", *argv, "--launcher", "slurm", "--wait",
           "--poll_s", "1", "--slurm_max_array_size", "1", "--slurm_time", "10"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), p.stdout.read()) for p in procs]
    submitted = sum(int(n) for _, text in results for n in re.findall(r"submitted (\d+) job", text))
    assert submitted == 2, f"each job must be submitted once: {results}"
    assert sorted(code for code, _ in results) == [1, 3], results  # one ran (a job failed), one was refused
    launched = next(text for code, text in results if code == 1)
    assert len(re.findall(r"submitted \d+ job", launched)) == 2, "2 jobs at MaxArraySize 1 make two submissions"
    assert "another launch is running" in next(text for code, text in results if code == 3)

    final = states(argv)
    assert final["ERM"].category == DONE
    assert final["broken"].category == FAILED
    assert any("hidden_dim" in line for line in final["broken"].log_tail)
    assert [r["step"] for r in run_files.read_records(dirs["ERM"])] == [0, 2, 4]
    assert (Path(argv[3]) / "slurm_logs").is_dir()


def test_scancelled_job_is_reported_failed_in_bounded_time_and_delete_incomplete_spares_it_while_running(
        tmp_path, data_dir, capsys):
    argv, dirs = make_sweep(tmp_path, data_dir, [{"algorithm": "ERM"}, {"algorithm": "VREx"}], steps=5000, freq=50)
    assert sweep.main(["launch", *argv, "--algorithms", "ERM", "--launcher", "slurm"]) == 0
    wait_for(lambda: run_files.is_locked(dirs["ERM"]), 120, "the ERM job to start training")
    # VREx: an interrupted local run, not running
    dirs["VREx"].mkdir(parents=True)
    run_files.append_record(dirs["VREx"], {"step": 0})
    update_launch_record(dirs["VREx"], launcher="local", host="h", returncode=None)

    assert sweep.main(["delete_incomplete", "--yes", *argv]) == 0
    assert not dirs["VREx"].exists()
    assert dirs["ERM"].exists() and states(argv)["ERM"].category == RUNNING

    subprocess.run(["scancel", slurm_id(dirs["ERM"])], check=True)
    took = wait_for(lambda: states(argv)["ERM"].category == FAILED, CANCEL_REPORTED_WITHIN_S,
                    "the cancelled job to be reported failed")
    print(f"cancelled job reported failed after {took:.1f} s")
    assert sweep.main(["status", *argv]) == 0
    assert "1 failed" in capsys.readouterr().out


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(tmp_path, data_dir):
    steps, freq = 60, 5
    argv, dirs = make_sweep(tmp_path, data_dir, [{"algorithm": "ERM"}], steps=steps, freq=freq)
    run_dir = dirs["ERM"]
    assert sweep.main(["launch", *argv, "--launcher", "slurm"]) == 0
    wait_for(lambda: len(run_files.read_records(run_dir)) >= 3, 120, "three checkpoints")
    # SLURM's preemption / time-limit signal (the USR2 that submitit asks sbatch for), delivered
    # to the task as slurmstepd does; `scancel --signal` retries on array tasks and can hit the
    # restarted job too early, which is not what a preemption does
    os.kill(int((run_dir / run_files.LOCK).read_text()), signal.SIGUSR2)
    wait_for(lambda: run_files.is_done(run_dir), 180, "the requeued job to finish")

    log = (run_dir / LOG).read_text()
    assert log.count("=== attempt") == 2 and "restart 1): resuming from checkpoint.pt" in log
    assert log.count("step 0:") == 1, "the requeued job started over instead of resuming"
    assert [r["step"] for r in run_files.read_records(run_dir)] == list(range(0, steps, freq)) + [steps - 1]
    assert states(argv)["ERM"].category == DONE
