"""A run SIGKILLed in the middle and relaunched ends with the records of an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from domainbed_sil import run_files, sweep
from domainbed_sil.launchers import LOG

# V-REx with its penalty switched on mid-run: the resumed run must restore the step counter
# (penalty schedule), Adam's state and the RNG streams to match the uninterrupted run.
HPARAMS = json.dumps({"hidden_dim": 8, "warmup_steps": 20})
STEPS, FREQ = 60, 5
VOLATILE = {"step_time"}  # wall-clock timing differs between runs
PER_RUN_ARGS = {"output_dir", "data_dir"}


def sweep_flags(data_dir: Path, out: Path):
    return ["--datasets", "ColoredMNIST", "--algorithms", "VREx", "--steps", str(STEPS),
            "--checkpoint_freq", str(FREQ), "--hparams", HPARAMS, "--data_dir", str(data_dir),
            "--threads", "1", "--output_dir", str(out)]


def launch_process(flags) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "domainbed_sil.sweep", "launch", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def comparable(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k not in VOLATILE}
    record["args"] = {k: v for k, v in record["args"].items() if k not in PER_RUN_ARGS}
    return record


def test_a_sigkilled_run_resumes_to_the_records_of_an_uninterrupted_run(tmp_path, data_dir, capsys):
    killed_flags, reference_flags = sweep_flags(data_dir, tmp_path / "killed"), sweep_flags(data_dir, tmp_path / "reference")
    (job,) = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", *killed_flags]))
    run_dir = tmp_path / "killed" / job.job_id

    reference = launch_process(reference_flags)  # runs alongside, on the other core
    launcher = launch_process(killed_flags)
    wait_for(lambda: len(run_files.read_records(run_dir)) >= 3, 120, "three checkpoints of the run to kill")
    train_pid = int((run_dir / run_files.LOCK).read_text())  # RunLock writes the holder's pid
    os.kill(train_pid, signal.SIGKILL)
    launcher_output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 1 and "FAILED" in launcher_output
    assert not run_files.is_done(run_dir)

    assert sweep.main(["status", *killed_flags]) == 0
    assert "exited with status -9" in capsys.readouterr().out

    assert sweep.main(["launch", *killed_flags]) == 0  # resumes
    assert reference.wait(timeout=120) == 0
    assert sweep.main(["status", *killed_flags]) == 0
    assert "1 jobs: 1 done" in capsys.readouterr().out

    log = (run_dir / LOG).read_text()
    assert log.count("=== attempt") == 2 and "resuming from checkpoint.pt" in log
    assert log.count("step 0:") == 1, "the relaunched run started over instead of resuming"
    resumed = run_files.read_records(run_dir)
    uninterrupted = run_files.read_records(tmp_path / "reference" / job.job_id)
    expected_steps = list(range(0, STEPS, FREQ)) + [STEPS - 1]
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == expected_steps
    for got, want in zip(resumed, uninterrupted):
        got, want = comparable(got), comparable(want)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"step {want['step']}: {key}"
            else:
                assert got[key] == value, f"step {want['step']}: {key}"
