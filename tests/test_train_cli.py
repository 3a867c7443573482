"""python -m domainbed_sil.train: records on real Colored MNIST, and one clear line for bad input."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from domainbed_sil import train
from domainbed_sil.run_files import read_records
from conftest import REPO_ROOT

TINY = '{"hidden_dim": 16}'


def run_main(tmp_path, *extra, data_dir=None):
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--steps", "3", "--checkpoint_freq", "2", *extra]
    if data_dir is not None:
        argv += ["--data_dir", str(data_dir)]
    return train.main(argv), out


@pytest.mark.parametrize("algorithm", ["ERM", "IRM", "VREx", "SIL"])
def test_a_short_run_writes_complete_records_and_done(tmp_path, data_dir, algorithm):
    rc, out = run_main(tmp_path, "--algorithm", algorithm, "--hparams", TINY, data_dir=data_dir)
    assert rc == 0
    records = read_records(out)
    assert [r["step"] for r in records] == [0, 2]
    last = records[-1]
    assert last["args"]["algorithm"] == algorithm and last["args"]["test_envs"] == [2]
    assert last["hparams"]["hidden_dim"] == 16
    for key in ("env0_in_acc", "env1_in_acc", "env2_in_acc", "env2_acc", "loss", "nll", "penalty", "step_time"):
        assert isinstance(last[key], float), key
    assert (out / "done").exists() and (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()


def test_holdout_fraction_adds_out_splits(tmp_path, data_dir):
    rc, out = run_main(tmp_path, "--hparams", TINY, "--holdout_fraction", "0.1", data_dir=data_dir)
    last = read_records(out)[-1]
    assert rc == 0 and {"env0_out_acc", "env1_out_acc", "env2_out_acc"} <= set(last)


def test_data_dir_comes_from_the_environment_variable(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("DOMAINBED_SIL_DATA", str(data_dir))
    rc, out = run_main(tmp_path, "--hparams", TINY)
    assert rc == 0 and read_records(out)[-1]["args"]["data_dir"] == str(data_dir)


def test_a_corrupt_checkpoint_is_set_aside_and_the_run_restarts(tmp_path, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        rc, _ = run_main(tmp_path, "--hparams", TINY, data_dir=data_dir)
    assert rc == 0 and [r["step"] for r in read_records(out)] == [0, 2]
    assert (out / "checkpoint.pt.corrupt").read_bytes() == b"truncated"


@pytest.mark.parametrize("other", [["--algorithm", "SIL"], ["--steps", "5"], ["--hparams", '{"hidden_dim": 8}']])
def test_a_run_dir_holding_another_run_is_refused_not_resumed(tmp_path, data_dir, capsys, other):
    rc, out = run_main(tmp_path, "--hparams", TINY, data_dir=data_dir)
    before = (out / "results.jsonl").read_text()
    argv = ["--output_dir", str(out), "--steps", "3", "--checkpoint_freq", "2", "--hparams", TINY,
            "--data_dir", str(data_dir), *other]
    capsys.readouterr()
    rc2 = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 0 and rc2 == 2
    assert err.startswith("error: run directory") and "holds another run" in err and err.count("\n") == 0
    assert (out / "results.jsonl").read_text() == before


def test_a_finished_run_is_not_run_again(tmp_path, data_dir):
    rc, out = run_main(tmp_path, "--hparams", TINY, data_dir=data_dir)
    before = (out / "results.jsonl").read_text()
    rc2, _ = run_main(tmp_path, "--hparams", TINY, data_dir=data_dir)
    assert rc == rc2 == 0 and (out / "results.jsonl").read_text() == before


@pytest.mark.parametrize("stored", ["missing", "auto"])
def test_a_finished_run_is_still_this_run_whatever_its_implementation_only_hparam(tmp_path, data_dir, stored):
    # SIL's score_norm_method picks how I(e) is computed, not its value: a run written before the
    # hparam existed (no key in run.json) or with the other method is the same run
    rc, out = run_main(tmp_path, "--algorithm", "SIL", "--hparams", TINY, data_dir=data_dir)
    identity = json.loads((out / "run.json").read_text())
    assert identity["resolved_hparams"]["score_norm_method"] == "auto"
    if stored == "missing":
        del identity["resolved_hparams"]["score_norm_method"]
    (out / "run.json").write_text(json.dumps(identity))
    before = (out / "results.jsonl").read_text()
    rc2, _ = run_main(tmp_path, "--algorithm", "SIL", "--hparams", TINY, data_dir=data_dir)
    rc3, _ = run_main(tmp_path, "--algorithm", "SIL", "--hparams", '{"hidden_dim": 16, "score_norm_method": "autograd"}',
                      data_dir=data_dir)
    assert rc == rc2 == rc3 == 0 and (out / "results.jsonl").read_text() == before


class _Interrupted(Exception):
    pass


def test_a_run_resumed_with_another_data_dir_and_score_norm_method_keeps_every_record(tmp_path, data_dir, monkeypatch):
    from domainbed_sil.algorithms.base import PenalizedAlgorithm
    from domainbed_sil.records import parse_results_file

    update, calls = PenalizedAlgorithm.update, []

    def update_then_stop(self, minibatches):
        calls.append(1)
        if len(calls) == 4:  # after the checkpoint of step 2
            raise _Interrupted
        return update(self, minibatches)

    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--steps", "5", "--checkpoint_freq", "2", "--algorithm", "SIL"]
    monkeypatch.setattr(PenalizedAlgorithm, "update", update_then_stop)
    with pytest.raises(_Interrupted):
        train.main([*argv, "--hparams", TINY, "--data_dir", str(data_dir)])
    monkeypatch.setattr(PenalizedAlgorithm, "update", update)
    moved = tmp_path / "data_elsewhere"
    moved.symlink_to(data_dir)
    assert train.main([*argv, "--hparams", '{"hidden_dim": 16, "score_norm_method": "autograd"}',
                       "--data_dir", str(moved)]) == 0
    parsed = parse_results_file(out / "results.jsonl")
    assert [r["step"] for r in read_records(out)] == [0, 2, 4]
    assert len(parsed.records) == 3 and not parsed.problems


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--algorithm", "Nope"], "unknown algorithm 'Nope'; valid names: ERM, IRM, SIL, VREx"),
        (["--dataset", "Nope"], "unknown dataset 'Nope'; valid names: "),
        (["--test_envs", "3"], "test env index 3 out of range for ColoredMNIST: expected 0..2"),
        (["--hparams", "{lr: 1}"], "--hparams is not valid JSON"),
        (["--hparams", "[1]"], "--hparams must be a JSON object"),
        (["--hparams", '{"lrr": 1}'], "unknown hparam(s) ['lrr']; valid names:"),
        (["--holdout_fraction", "1.5"], "--holdout_fraction must be in [0, 1)"),
        (["--hparams", '{"hidden_dim": -1}'], "hparam 'hidden_dim' must be a positive integer, got -1"),
        (["--test_envs", "2", "2"], "name an environment twice"),
        (["--device", "cuda:7"], "expected cpu or cuda:0"),
        (["--device", "tpu"], "--device 'tpu' is not a torch device"),
        (["--threads", "0"], "--threads must be a positive integer"),
        (["--hparams", '{"sil_variance": "sample"}', "--algorithm", "SIL"], "hparam 'sil_variance' must be one of"),
        (["--hparams", '{"env_loss_reduction": "max"}'], "hparam 'env_loss_reduction' must be one of"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_run_dir(tmp_path, data_dir, capsys, argv, message):
    rc, out = run_main(tmp_path, *argv, data_dir=data_dir)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and err.startswith("error: ") and message in err
    assert not out.exists()


def test_missing_data_dir_is_named(tmp_path, capsys):
    rc, out = run_main(tmp_path, data_dir=tmp_path / "nowhere")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"data directory {tmp_path / 'nowhere'} does not exist" in err and not out.exists()


def test_missing_mnist_file_is_named_with_the_download_command(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, out = run_main(tmp_path, data_dir=tmp_path / "empty")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "missing MNIST file" in err and "domainbed_sil.download mnist" in err
    assert err.count("\n") == 0 and not out.exists()


def test_corrupt_mnist_file_is_one_line_naming_path_and_expected_md5(tmp_path, data_dir, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    shutil.copytree(data_dir / "MNIST" / "raw", raw)
    broken = raw / "train-labels-idx1-ubyte.gz"
    broken.chmod(0o644)
    broken.write_bytes(b"not gzip at all")
    rc, out = run_main(tmp_path, data_dir=tmp_path / "data")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(broken) in err and err.count("\n") == 0 and not out.exists()


NEW_ALGORITHM = textwrap.dedent(
    '''
    """A throw-away algorithm written by the test: ERM plus a constant penalty."""
    import torch

    from domainbed_sil.algorithms import register_algorithm
    from domainbed_sil.algorithms.base import PenalizedAlgorithm
    from domainbed_sil.hparams import HParam


    @register_algorithm("ConstantPenaltyForTest")
    class ConstantPenaltyForTest(PenalizedAlgorithm):
        HPARAMS = {"constant": HParam(0.5), "warmup_steps": HParam(0), "penalty_weight": HParam(1.0)}

        def penalty(self, batches):
            return torch.tensor(self.hparams["constant"])
    '''
)


@pytest.fixture
def new_algorithm_module():
    path = REPO_ROOT / "domainbed_sil" / "algorithms" / "_constant_penalty_for_test.py"
    path.write_text(NEW_ALGORITHM)
    yield path
    path.unlink()


def test_a_new_algorithm_module_is_picked_up_by_registry_hparams_and_training_loop(tmp_path, data_dir, new_algorithm_module):
    # a fresh interpreter, like a user's, with nothing edited but the new module
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "domainbed_sil.train", "--algorithm", "ConstantPenaltyForTest", "--data_dir", str(data_dir),
           "--steps", "2", "--checkpoint_freq", "1", "--output_dir", str(out), "--hparams", '{"hidden_dim": 8, "constant": 0.25}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert last["args"]["algorithm"] == "ConstantPenaltyForTest"
    assert last["hparams"]["constant"] == 0.25 and last["penalty"] == pytest.approx(0.25)


def test_an_algorithm_file_outside_the_package_is_loaded_from_the_plugins_variable(tmp_path, data_dir):
    plugin = tmp_path / "my_algorithms" / "constant_penalty.py"
    plugin.parent.mkdir()
    plugin.write_text(NEW_ALGORITHM)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "domainbed_sil.train", "--algorithm", "ConstantPenaltyForTest", "--data_dir", str(data_dir),
           "--steps", "1", "--output_dir", str(out), "--hparams", '{"hidden_dim": 8}']
    env = {**os.environ, "DOMAINBED_SIL_PLUGINS": str(plugin)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    last = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert last["args"]["algorithm"] == "ConstantPenaltyForTest" and last["penalty"] == pytest.approx(0.5)


def test_a_missing_plugin_file_is_one_line_and_exit_2(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "domainbed_sil.train", "--data_dir", str(data_dir), "--output_dir", str(tmp_path / "run")]
    env = {**os.environ, "DOMAINBED_SIL_PLUGINS": str(tmp_path / "absent.py")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "DOMAINBED_SIL_PLUGINS: no file" in proc.stderr and str(tmp_path / "absent.py") in proc.stderr
    assert not (tmp_path / "run").exists()


def _algorithm_names_with_plugins(plugins: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    code = "from domainbed_sil.algorithms import ALGORITHMS; print(' '.join(ALGORITHMS.names()))"
    env = {**os.environ, "DOMAINBED_SIL_PLUGINS": plugins}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_plugins_files_of_the_same_name_and_modules_by_name_all_register(tmp_path):
    template = textwrap.dedent('''
        from domainbed_sil.algorithms import register_algorithm
        from domainbed_sil.algorithms.erm import ERM

        @register_algorithm("{name}")
        class {name}(ERM):
            pass
    ''')
    for folder, name in (("a", "PluginA"), ("b", "PluginB")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "plugin.py").write_text(template.format(name=name))
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "my_module_plugin.py").write_text(template.format(name="PluginC"))
    plugins = os.pathsep.join([str(tmp_path / "a" / "plugin.py"), " ", str(tmp_path / "b" / "plugin.py"), "my_module_plugin"])
    proc = _algorithm_names_with_plugins(plugins, pythonpath=str(tmp_path / "mods"))
    assert proc.returncode == 0, proc.stderr
    assert {"PluginA", "PluginB", "PluginC", "SIL", "ERM"} <= set(proc.stdout.split())


def test_a_misspelled_plugin_module_names_the_variable(tmp_path):
    proc = _algorithm_names_with_plugins("no_such_plugin_module")
    assert proc.returncode != 0
    assert "$DOMAINBED_SIL_PLUGINS: cannot import module 'no_such_plugin_module'" in proc.stderr


def test_a_name_defined_twice_names_both_files(tmp_path):
    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "twice.py").write_text(textwrap.dedent('''
            from domainbed_sil.algorithms import register_algorithm
            from domainbed_sil.algorithms.erm import ERM

            @register_algorithm("DefinedTwice")
            class DefinedTwice(ERM):
                VERSION = "%s"
        ''' % folder))
    proc = _algorithm_names_with_plugins(os.pathsep.join(str(tmp_path / f / "twice.py") for f in ("first", "second")))
    assert proc.returncode != 0
    assert (f"algorithm 'DefinedTwice' is defined twice: in {tmp_path / 'first' / 'twice.py'} "
            f"and in {tmp_path / 'second' / 'twice.py'}") in proc.stderr
