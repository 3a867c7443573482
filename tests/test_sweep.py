"""Sweeps: job expansion and identity, spec format, CLI errors, locks, local launcher on real data."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from domainbed_sil import hparams, run_files, sweep
from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.datasets import DATASETS
from domainbed_sil.jobs import array_chunks, expand, parse_test_envs_cli
from domainbed_sil.launchers import (
    LaunchError, Task, job_state, local_parallelism, read_launch_record, slurm_minutes, update_launch_record,
    wait_slurm,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

# The shape of sweeps/table1_cmnist_flip.json (Table 1): per-row steps, the grayscale oracle row.
TABLE1_LIKE = {
    "datasets": ["ColoredMNIST"],
    "n_trials": 10,
    "rows": [
        {"algorithm": "SIL", "steps": 1500},
        {"algorithm": "VREx", "steps": 501},
        {"algorithm": "IRM", "steps": 501},
        {"algorithm": "ERM", "steps": 501},
        {"name": "oracle", "algorithm": "ERM", "steps": 101,
         "hparams": {"grayscale_model": True, "hidden_dim": 83, "l2_weight": 0.0008602868865288383,
                     "lr": 0.0028171488133821726}},
    ],
}


def write_spec(tmp_path: Path, spec: dict, name: str = "spec.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


# --- expansion and identity ------------------------------------------------------------------

def test_rows_keep_their_own_steps_and_hparams_and_trials_multiply_them():
    jobs = expand(TABLE1_LIKE)
    assert len(jobs) == 5 * 10
    steps = {job.name: job.steps for job in jobs}
    assert steps == {"SIL": 1500, "VREx": 501, "IRM": 501, "ERM": 501, "oracle": 101}
    oracle = [job for job in jobs if job.name == "oracle"]
    assert {job.algorithm for job in oracle} == {"ERM"}
    assert oracle[0].hparams["grayscale_model"] is True
    assert [job.trial_seed for job in oracle] == list(range(10))
    assert all(job.test_envs == (2,) for job in jobs)  # the dataset's default test env


def test_expansion_is_deterministic():
    assert [j.job_id for j in expand(TABLE1_LIKE)] == [j.job_id for j in expand(json.loads(json.dumps(TABLE1_LIKE)))]


def test_command_line_settings_override_every_row_and_merge_hparams():
    jobs = expand(TABLE1_LIKE, {"steps": 20, "n_trials": 2, "hparams": {"hidden_dim": 8}})
    assert len(jobs) == 5 * 2
    assert {job.steps for job in jobs} == {20}
    assert all(job.hparams["hidden_dim"] == 8 for job in jobs)
    oracle = next(job for job in jobs if job.name == "oracle")
    assert oracle.hparams["grayscale_model"] is True and oracle.hparams["lr"] == 0.0028171488133821726


def test_algorithms_flag_selects_rows_by_name_or_algorithm():
    assert {job.name for job in expand(TABLE1_LIKE, {"algorithms": ["oracle", "SIL"]})} == {"oracle", "SIL"}
    assert {job.name for job in expand(TABLE1_LIKE, {"algorithms": ["ERM"]})} == {"ERM", "oracle"}


def test_job_id_depends_on_defining_args_only_and_seed_not_on_run_length():
    base = {"datasets": ["ColoredMNIST"], "algorithms": ["ERM"]}
    short, long = expand(base, {"steps": 10})[0], expand(base, {"steps": 20})[0]
    assert short.job_id != long.job_id
    assert short.seed == long.seed  # a shorter run is a prefix of the longer one
    trial0, trial1 = expand(base, {"n_trials": 2})
    assert trial0.seed != trial1.seed and trial0.job_id != trial1.job_id


def test_data_dir_output_dir_and_launcher_do_not_change_job_directories(tmp_path, capsys):
    spec = write_spec(tmp_path, {"datasets": ["ColoredMNIST"], "algorithms": ["ERM", "IRM"], "steps": 3})
    listings = []
    for out, data in [("a", "/data/one"), ("b", "/elsewhere/two")]:
        assert sweep.main(["launch", "--dry_run", "--sweep", str(spec), "--output_dir", str(tmp_path / out),
                           "--data_dir", data, "--launcher", "slurm"]) == 0
        listings.append([line.split()[0] for line in capsys.readouterr().out.splitlines() if line[:1].isalnum()
                         and not line.startswith("/")])
    assert listings[0] == listings[1] and len(listings[0]) == 2
    assert not (tmp_path / "a").exists(), "a dry run must touch nothing"


def test_test_envs_all_gives_one_job_per_environment_and_cli_sets_parse():
    jobs = expand({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "test_envs": "all"})
    assert [job.test_envs for job in jobs] == [(0,), (1,), (2,)]
    assert parse_test_envs_cli(["0", "1,2"]) == [[0], [1, 2]]
    assert parse_test_envs_cli(["all"]) == "all"
    assert parse_test_envs_cli(None) is None


def test_array_chunks_split_at_max_array_size():
    assert array_chunks(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert array_chunks(list(range(3)), 1001) == [[0, 1, 2]]


def test_local_parallelism_never_exceeds_the_cores():
    assert local_parallelism(8, None, None) == (8, 1)
    assert local_parallelism(8, 3, None) == (2, 3)
    assert local_parallelism(8, 2, 10) == (4, 2)
    with pytest.raises(LaunchError, match="--threads"):
        local_parallelism(2, 4, None)


@pytest.mark.parametrize("text, minutes", [("60", 60), ("1:30", 2), ("2:00:00", 120), ("1-2:03", 1563)])
def test_slurm_time_accepts_minutes_and_sbatch_syntax(text, minutes):
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("text", ["soon", "-5", "0", "1:2:3:4"])
def test_slurm_time_rejects_what_sbatch_would(text):
    with pytest.raises(LaunchError, match="--slurm_time"):
        slurm_minutes(text)


# --- bad input: one line, exit 2 ---------------------------------------------------------------

@pytest.mark.parametrize("spec, flags, message", [
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "stepz": 3}, [], "unknown key 'stepz'"),
    ({"datasets": ["ColoredMNIST"], "rows": [{"algorithm": "Nope"}]}, [], "unknown algorithm 'Nope'"),
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "test_envs": [[7]]}, [], "test env index 7"),
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "test_envs": [2]}, [], "list of sets"),
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "hparams": {"lr": "fast"}}, [], "hparam 'lr' expects a value of type float"),
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "n_trials": 0}, [], "'n_trials' must be a positive integer"),
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"]}, ["--hparams", "{lr: 1}"], "--hparams is not valid JSON"),
    ({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"]}, ["--test_envs", "two"], "--test_envs expects"),
    ({"datasets": ["ColoredMNIST"], "rows": [{"algorithm": "ERM"}]}, ["--algorithms", "SIL"], "matches no row"),
    ({"algorithms": ["ERM"]}, [], "no datasets"),
])
def test_bad_sweep_input_is_one_line_and_exit_2(tmp_path, capsys, spec, flags, message):
    path = write_spec(tmp_path, spec)
    assert sweep.main(["status", "--sweep", str(path), "--output_dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("dry_run", [[], ["--dry_run"]])
def test_launch_with_an_unknown_malloc_setting_is_refused_before_any_job(tmp_path, capsys, monkeypatch, dry_run):
    # every job would fail on it: the launch says so once, up front
    monkeypatch.setenv("DOMAINBED_SIL_MALLOC", "bogus")
    path = write_spec(tmp_path, {"datasets": ["ColoredMNIST"], "algorithms": ["ERM"]})
    out = tmp_path / "out"
    assert sweep.main(["launch", "--sweep", str(path), "--output_dir", str(out), "--steps", "2", *dry_run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: $DOMAINBED_SIL_MALLOC must be one of") and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_missing_or_invalid_spec_file_is_named(tmp_path, capsys):
    assert sweep.main(["status", "--sweep", str(tmp_path / "nope.json")]) == 2
    assert "nope.json not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{\"rows\": [}")
    assert sweep.main(["status", "--sweep", str(bad)]) == 2
    assert "bad.json: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("spec", sorted(p.name for p in (REPO_ROOT / "sweeps").glob("*.json")))
def test_every_committed_sweep_spec_expands_to_valid_jobs_with_a_description(spec):
    path = REPO_ROOT / "sweeps" / spec
    jobs = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", "--sweep", str(path)]))
    assert jobs and len({job.job_id for job in jobs}) == len(jobs)
    assert json.loads(path.read_text()).get("description"), "a spec says what it is (and what a quick one reduces)"
    for job in jobs:  # every row's hparams are known to its algorithm and dataset
        hparams.apply_overrides(hparams.random_hparams(ALGORITHMS.get(job.algorithm), DATASETS.get(job.dataset),
                                                       job.hparams_seed, job.trial_seed),
                                hparams.parse_overrides(job.hparams_json))


def test_quick_smoke_spec_expands_to_eight_jobs():
    jobs = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", "--sweep", str(REPO_ROOT / "sweeps/quick_smoke.json")]))
    assert len(jobs) == 8 and {job.algorithm for job in jobs} == {"ERM", "IRM", "VREx", "SIL"}


# --- locks, status and delete_incomplete on hand-made job directories ---------------------------

@pytest.fixture
def two_job_sweep(tmp_path):
    """A 2-job sweep spec (ERM and VREx) and its output dir; returns (argv prefix, job dirs)."""
    spec = write_spec(tmp_path, {"datasets": ["ColoredMNIST"], "algorithms": ["ERM", "VREx"], "steps": 3})
    out = tmp_path / "out"
    prefix = ["--sweep", str(spec), "--output_dir", str(out)]
    jobs = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", *prefix]))
    return prefix, [out / job.job_id for job in jobs]


def test_a_second_launch_into_a_busy_sweep_dir_is_refused(two_job_sweep, capsys):
    prefix, _ = two_job_sweep
    out = Path(prefix[-1])
    with sweep.SweepLock(out):
        assert sweep.main(["launch", *prefix]) == 3
        assert "another launch is running" in capsys.readouterr().err
        assert sweep.main(["delete_incomplete", "--yes", *prefix]) == 3
        assert sweep.main(["status", *prefix]) == 0
        assert "a launch is in progress" in capsys.readouterr().out
    assert not any(p.name != sweep.SWEEP_LOCK for p in out.iterdir()), "the refused launch must not have started jobs"


def test_delete_incomplete_removes_incomplete_and_failed_but_never_running_or_done(two_job_sweep, capsys):
    prefix, (running_dir, incomplete_dir) = two_job_sweep
    for d in (running_dir, incomplete_dir):
        d.mkdir(parents=True)
        run_files.append_record(d, {"step": 0})
        update_launch_record(d, launcher="local", host="h", returncode=None)
    with run_files.RunLock(running_dir):  # a live run holds this lock
        assert sweep.main(["status", *prefix]) == 0
        out = capsys.readouterr().out
        assert "0 done, 1 running, 0 failed, 1 incomplete, 0 not launched" in out
        assert sweep.main(["delete_incomplete", "--yes", *prefix]) == 0
    assert running_dir.exists() and not incomplete_dir.exists()
    # once that run has stopped with a failure it is deletable
    update_launch_record(running_dir, returncode=1)
    assert sweep.main(["delete_incomplete", "--dry_run", *prefix]) == 0
    assert "would delete" in capsys.readouterr().out and running_dir.exists()
    assert sweep.main(["delete_incomplete", "--yes", *prefix]) == 0
    assert not running_dir.exists()


@pytest.fixture
def fake_train_process():
    """Start live processes whose command line looks like a local job's ``train --output_dir DIR``."""
    procs = []

    def start(output_dir: Path) -> subprocess.Popen:
        procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                       "-m", "domainbed_sil.train", "--output_dir", str(output_dir)]))
        return procs[-1]

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_local_job_still_starting_up_is_running_not_incomplete(two_job_sweep, fake_train_process):
    prefix, (run_dir, other_dir) = two_job_sweep
    run_dir.mkdir(parents=True)
    job = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", *prefix]))[0]
    starting = fake_train_process(run_dir)
    update_launch_record(run_dir, launcher="local", host=socket.gethostname(), pid=starting.pid, returncode=None)
    state = job_state(job, run_dir, {})
    assert state.category == "running" and "starting" in state.detail
    starting.kill()
    starting.wait()
    assert job_state(job, run_dir, {}).category == "incomplete"  # the process is gone


@pytest.mark.parametrize("owner", ["another job's training", "not a training process", "another host"])
def test_a_reused_pid_does_not_keep_a_dead_local_job_running(two_job_sweep, fake_train_process, owner):
    prefix, (run_dir, other_dir) = two_job_sweep
    run_dir.mkdir(parents=True)
    job = sweep.sweep_jobs(sweep.build_parser().parse_args(["status", *prefix]))[0]
    pid, host = fake_train_process(other_dir).pid, socket.gethostname()
    if owner == "not a training process":
        pid = os.getpid()
    elif owner == "another host":
        pid, host = fake_train_process(run_dir).pid, "another-host"
    update_launch_record(run_dir, launcher="local", host=host, pid=pid, returncode=None)
    assert job_state(job, run_dir, {}).category == "incomplete"


# --- the local launcher on real Colored MNIST ----------------------------------------------------

def test_local_sweep_finishes_real_jobs_and_reports_the_failing_one_with_its_log(tmp_path, data_dir, capsys):
    spec = write_spec(tmp_path, {
        "datasets": ["ColoredMNIST"], "steps": 5, "checkpoint_freq": 2, "hparams": {"hidden_dim": 8},
        "rows": [{"algorithm": "ERM"}, {"algorithm": "VREx"},
                 {"name": "broken", "algorithm": "ERM", "hparams": {"hidden_dim": -1}}],
    })
    argv = ["--sweep", str(spec), "--output_dir", str(tmp_path / "out"), "--data_dir", str(data_dir)]
    assert sweep.main(["launch", *argv, "--threads", "1"]) == 1  # one job failed
    assert "FAILED" in capsys.readouterr().out
    assert sweep.main(["status", *argv]) == 0
    report = capsys.readouterr().out
    assert "3 jobs: 2 done, 0 running, 1 failed, 0 incomplete, 0 not launched" in report
    failed_section = report.split("failed:")[1]
    assert "broken(ERM)" in failed_section and "hidden_dim" in failed_section and "exited with status 2" in failed_section
    for job in sweep.sweep_jobs(sweep.build_parser().parse_args(["status", *argv])):
        run_dir = tmp_path / "out" / job.job_id
        if job.name == "broken":
            assert read_launch_record(run_dir)["returncode"] == 2
            continue
        records = run_files.read_records(run_dir)
        assert [r["step"] for r in records] == [0, 2, 4]
        assert records[-1]["args"]["seed"] == job.seed and "=== attempt" in (run_dir / "train.log").read_text()
    # a relaunch skips the done jobs and retries only the failed one
    assert sweep.main(["launch", "--dry_run", *argv]) == 0
    assert "2 done and 0 running (skipped), 1 to launch" in capsys.readouterr().out


# --- SLURM job states from squeue, without a cluster -------------------------------------------

@pytest.fixture
def submitted_job(tmp_path):
    """A job whose directory says it was submitted to SLURM as 41_3 and wrote one record."""
    job = expand({"datasets": ["ColoredMNIST"], "algorithms": ["ERM"], "steps": 3})[0]
    run_dir = tmp_path / job.job_id
    run_dir.mkdir()
    run_files.append_record(run_dir, {"step": 0})
    update_launch_record(run_dir, launcher="slurm", slurm_job_id="41_3", returncode=None)
    return job, run_dir


@pytest.mark.parametrize("queue, category", [
    ({"41_3": "PENDING"}, "running"),
    ({"41_3": "REQUEUED"}, "running"),
    ({"41_3": "RUNNING"}, "running"),
    ({"41_3": "CANCELLED"}, "failed"),
    ({"41_3": "OUT_OF_MEMORY"}, "failed"),
    ({}, "failed"),  # aged out of the queue without writing done
    (None, "incomplete"),  # squeue unavailable: unknown, never guessed failed
])
def test_slurm_job_state_comes_from_squeue_and_the_run_files(submitted_job, queue, category):
    job, run_dir = submitted_job
    state = job_state(job, run_dir, queue)
    assert state.category == category
    assert state.uncertain == (queue is None)


def test_a_done_run_is_done_whatever_the_queue_says(submitted_job):
    job, run_dir = submitted_job
    run_files.mark_done(run_dir)
    assert job_state(job, run_dir, {"41_3": "COMPLETING"}).category == "done"


def test_waiting_on_slurm_gives_up_when_squeue_keeps_failing(submitted_job):
    job, run_dir = submitted_job
    with pytest.raises(LaunchError, match="squeue failed 3 times"):
        wait_slurm([Task(job, run_dir, [])], poll_s=0, max_unknown_polls=3, queue_fn=lambda: None)


def test_waiting_on_slurm_ends_when_a_job_leaves_the_queue(submitted_job):
    job, run_dir = submitted_job
    polls = iter([{"41_3": "RUNNING"}, {"41_3": "CANCELLED"}])
    assert wait_slurm([Task(job, run_dir, [])], poll_s=0, queue_fn=lambda: next(polls)) == {job.job_id: "failed"}


def test_sweep_jobs_differing_only_in_an_implementation_hparam_share_their_seed_not_their_dir():
    jobs = [expand({"datasets": ["ColoredMNIST"], "algorithms": ["SIL"], "hparams": overrides})[0]
            for overrides in ({}, {"score_norm_method": "autograd"}, {"lr": 0.002})]
    assert jobs[0].seed == jobs[1].seed != jobs[2].seed
    assert len({job.job_id for job in jobs}) == 3
