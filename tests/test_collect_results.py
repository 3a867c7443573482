"""collect_results end to end: records on disk -> tables, cell by cell; robustness; CLI; real runs."""
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from domainbed_sil import collect_results, paper_results
from domainbed_sil.records import load_sweep
from domainbed_sil.tables import TRAIN_IN_VALIDATION_NOTE, build_tables, environment_labels, latex_escape, to_csv, to_latex

REPO = Path(__file__).resolve().parents[1]
PROTOCOL = REPO.parent / "shared" / "PROTOCOL.md"
DATA = Path(os.environ.get("DOMAINBED_SIL_DATA", REPO.parent / "shared" / "data"))


# ---------------------------------------------------------------- writing synthetic sweeps

def run_args(dataset="ColoredMNIST", algorithm="ERM", test_envs=(2,), trial=0, hparams_seed=0, steps=3,
             overrides=None, holdout=0.0):
    return {"dataset": dataset, "algorithm": algorithm, "test_envs": list(test_envs), "hparams": overrides,
            "hparams_seed": hparams_seed, "trial_seed": trial, "seed": 0, "steps": steps, "checkpoint_freq": 1,
            "holdout_fraction": holdout, "data_dir": "/data", "output_dir": "out"}


def write_run(root, name, args, records, hparams=None, done=True, lines_after=()):
    """A run directory: results.jsonl (records, then raw ``lines_after``) and optionally ``done``."""
    run_dir = Path(root) / name
    run_dir.mkdir(parents=True)
    lines = [json.dumps({"args": args, "hparams": hparams or {}, **r}) for r in records] + list(lines_after)
    (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
    if done:
        (run_dir / "done").write_text("done\n")
    return run_dir


def cmnist(step, train, test, **extra):
    """A Colored MNIST record: both train envs at ``train``, test env 2 at ``test`` (holdout 0)."""
    accs = {"env0_in_acc": train, "env0_acc": train, "env1_in_acc": train, "env1_acc": train,
            "env2_in_acc": test, "env2_acc": test}
    return {"step": step, "loss": 0.5, "nll": 0.5, "penalty": 0.1, "penalty_weight": 1.0, **accs, **extra}


def final_run(root, name, train, test, done=True, lines_after=(), **args_kw):
    """A 3-step run whose last checkpoint has ``train`` / ``test``; earlier checkpoints are far off."""
    records = [cmnist(0, 0.5, 0.5), cmnist(1, 0.99, 0.01), cmnist(2, train, test)]
    hparams = {"grayscale_model": True} if (args_kw.get("overrides") or {}).get("grayscale_model") else {}
    return write_run(root, name, run_args(**args_kw), records, hparams=hparams, done=done, lines_after=lines_after)


def sweep_tables(root, methods=None, include_incomplete=False):
    tables, _ = build_tables(load_sweep(root, include_incomplete=include_incomplete), methods)
    return {t.key: t for t in tables}


def as_dict(table):
    return {row[0]: dict(zip(table.headers, row)) for row in table.rows}


# ---------------------------------------------------------------- the paper's numbers

def _parse_protocol_section4(text):
    """{table number: {row name: [(mean, std or None), ...]}} from PROTOCOL.md section 4."""
    section = text.split("## 4.")[1].split("## 5.")[0].split("Independent reruns")[0]
    names = {"V-REx": "VREx", "hypothetical optimum": paper_results.HYPOTHETICAL_OPTIMUM,
             "grayscale oracle": paper_results.GRAYSCALE_ORACLE,
             "reference rows: adversarial target-invariance": paper_results.ADVERSARIAL}
    tables = {}
    for block in re.split(r"\n(?=Table \d)", section.strip())[1:]:  # [0] is the section title
        number = int(re.match(r"Table (\d)", block).group(1))
        body = block.split("\n", 1)[1]  # after the table's header line
        rows = {}
        for entry in re.split(r";|\n", body):
            entry = entry.strip().rstrip(".")
            m = re.match(r"([A-Za-z][A-Za-z :\-]*?)\s+(\d.*)$", entry)
            if not m:
                continue
            values = [tuple(float(x) if x else None for x in re.fullmatch(r"([\d.]+)(?:\+-([\d.]+))?", v.strip()).groups())
                      for v in m.group(2).split("/")]
            rows[names.get(m.group(1).strip(), m.group(1).strip())] = values
        tables[number] = rows
    return tables


@pytest.mark.skipif(not PROTOCOL.exists(), reason="PROTOCOL.md (../shared) not present in this checkout")
def test_paper_numbers_equal_protocol_section_4():
    parsed = _parse_protocol_section4(PROTOCOL.read_text())
    for number, table in enumerate(paper_results.PAPER_TABLES, start=1):
        assert set(parsed[number]) == set(table.rows), number
        for row, values in parsed[number].items():
            ours = [(table.rows[row][c].mean, table.rows[row][c].std) for c in table.columns]
            assert ours == values, (number, row)


def test_paper_domain_columns_map_to_domainbed_env_indices():
    assert paper_results.TABLE3.env_of_column == {"Caltech": 0, "SUN": 2, "Pascal": 3, "LabelMe": 1}
    assert paper_results.TABLE4.env_of_column == {"Art painting": 0, "Cartoon": 1, "Sketch": 3, "Photo": 2}


# ---------------------------------------------------------------- Tables 1-4 cell by cell

def test_table1_cells_final_step_beside_paper(tmp_path):
    final_run(tmp_path, "erm0", 0.86, 0.16, trial=0)
    final_run(tmp_path, "erm1", 0.84, 0.18, trial=1)
    final_run(tmp_path, "sil0", 0.70, 0.71, algorithm="SIL", steps=1500)
    final_run(tmp_path, "gray0", 0.735, 0.73, overrides={"grayscale_model": True})
    final_run(tmp_path, "new0", 0.60, 0.60, algorithm="My_Alg")
    table = sweep_tables(tmp_path)["table1_final_step"]
    assert table.headers == ["Method", "Train", "Train (paper)", "Train Δ", "Test", "Test (paper)", "Test Δ", "n"]
    assert table.rows == [
        ["SIL", "70.0 ± 0.0", "69.6 ± 1.3", "+0.4", "71.0 ± 0.0", "70.4 ± 1.8", "+0.6", "1"],
        ["VREx", "—", "71.5 ± 1.0", "", "—", "68.7 ± 0.9", "", "0"],
        ["IRM", "—", "70.8 ± 0.9", "", "—", "66.9 ± 2.5", "", "0"],
        ["ERM", "85.0 ± 1.0", "87.4 ± 0.2", "-2.4", "17.0 ± 1.0", "17.1 ± 0.6", "-0.1", "2"],
        ["My_Alg", "60.0 ± 0.0", "—", "", "60.0 ± 0.0", "—", "", "1"],
        ["Hypothetical optimum", "75.0", "75.0", "", "75.0", "75.0", "", "—"],
        ["Grayscale oracle", "73.5 ± 0.0", "73.5 ± 0.2", "+0.0", "73.0 ± 0.0", "73.0 ± 0.4", "+0.0", "1"],
    ]
    assert table.notes == []
    assert table.summary == "Summary: 5 run(s) read; 5 in cells; excluded 0."


def test_table2_uses_its_own_dataset_and_optimum(tmp_path):
    final_run(tmp_path, "erm0", 0.99, 0.93, dataset="ColoredMNISTNoFlip")
    final_run(tmp_path, "other", 0.5, 0.5, dataset="ColoredMNIST")
    tables = sweep_tables(tmp_path)
    rows = as_dict(tables["table2_final_step"])
    assert rows["ERM"]["Train"] == "99.0 ± 0.0" and rows["ERM"]["Test Δ"] == "+0.5"
    assert rows["Hypothetical optimum"]["Test"] == "100.0"
    assert as_dict(tables["table1_final_step"])["ERM"]["Test"] == "50.0 ± 0.0"


def _domain_sweep(root, dataset, base, algorithm="ERM", trials=(0, 1)):
    """Runs per test env with a holdout: step 0 best on training-env validation, step 1 worse."""
    n_envs = len(base)
    for t, acc in base.items():
        for trial in trials:
            def record(step, val, test):
                rec = {"step": step, "loss": 1.0, "penalty": 0.0}
                for i in range(n_envs):
                    rec[f"env{i}_in_acc"] = 0.8
                    rec[f"env{i}_out_acc"] = val if i != t else 0.5
                    rec[f"env{i}_acc"] = test if i == t else 0.8
                return rec
            write_run(root, f"{algorithm}_{dataset}_t{t}_s{trial}",
                      run_args(dataset, algorithm, (t,), trial=trial, holdout=0.1, steps=2),
                      [record(0, 0.9, acc + 0.01 * trial), record(1, 0.4, 0.0)])


def test_table3_vlcs_columns_in_paper_order_with_average_and_differences(tmp_path):
    # DomainBed env order: 0 Caltech101, 1 LabelMe, 2 SUN09, 3 VOC2007 (Pascal)
    _domain_sweep(tmp_path, "VLCS", {0: 0.95, 1: 0.60, 2: 0.62, 3: 0.70})
    table = sweep_tables(tmp_path)["table3_training_domain"]
    assert table.headers[1:4] == ["Caltech", "Caltech (paper)", "Caltech Δ"]
    assert [h for h in table.headers if "(" not in h and "Δ" not in h] == ["Method", "Caltech", "SUN", "Pascal", "LabelMe", "Avg", "n"]
    erm = as_dict(table)["ERM"]
    assert (erm["Caltech"], erm["Caltech (paper)"], erm["Caltech Δ"]) == ("95.50 ± 0.50", "94.76", "+0.74")
    assert (erm["SUN"], erm["SUN Δ"]) == ("62.50 ± 0.50", "+0.58")
    assert (erm["Pascal"], erm["Pascal Δ"]) == ("70.50 ± 0.50", "+1.47")
    assert (erm["LabelMe"], erm["LabelMe Δ"]) == ("60.50 ± 0.50", "-0.05")
    assert (erm["Avg"], erm["Avg (paper)"], erm["Avg Δ"]) == ("72.25", "71.56", "+0.69")
    assert erm["n"] == "2"
    sil = as_dict(table)["SIL"]
    assert (sil["Caltech"], sil["Caltech (paper)"], sil["Avg"]) == ("—", "96.89 ± 0.31", "—")


def test_table4_pacs_order_and_reference_rows_as_reported(tmp_path):
    # DomainBed env order: 0 art_painting, 1 cartoon, 2 photo, 3 sketch
    _domain_sweep(tmp_path, "PACS", {0: 0.66, 1: 0.67, 2: 0.89, 3: 0.58}, algorithm="SIL", trials=(0,))
    table = sweep_tables(tmp_path)["table4_training_domain"]
    rows = as_dict(table)
    sil = rows["SIL"]
    assert [sil[c] for c in ("Art painting", "Cartoon", "Sketch", "Photo", "Avg")] == \
        ["66.00 ± 0.00", "67.00 ± 0.00", "58.00 ± 0.00", "89.00 ± 0.00", "70.00"]
    assert sil["Sketch Δ"] == "-5.10"
    jig = rows["Jigsaw"]
    assert [jig[f"{c} (paper)"] for c in ("Art painting", "Cartoon", "Sketch", "Photo", "Avg")] == \
        ["67.63", "71.71", "65.18", "89.00", "73.38"]
    assert jig["Art painting"] == "reported only"
    assert [r[0] for r in table.rows][-2:] == [paper_results.ADVERSARIAL, paper_results.JIGSAW]


def test_all_selection_methods_give_one_table_each_and_cells_say_why_they_fail(tmp_path):
    _domain_sweep(tmp_path, "PACS", {0: 0.66, 1: 0.67, 2: 0.89, 3: 0.58}, trials=(0,))
    tables = sweep_tables(tmp_path, methods=["training_domain", "leave_one_out", "oracle", "final_step"])
    assert {k for k in tables if k.startswith("table4")} == {
        "table4_training_domain", "table4_leave_one_out", "table4_oracle", "table4_final_step"}
    lodo = tables["table4_leave_one_out"]
    erm = as_dict(lodo)["ERM"]
    assert erm["Art painting"].startswith("— [a]")
    assert any("missing pair run(s) test_envs=[0, 1], test_envs=[0, 2], test_envs=[0, 3]" in n for n in lodo.notes)
    oracle = as_dict(tables["table4_oracle"])["ERM"]
    assert oracle["Photo"] == "80.00 ± 0.00"  # last checkpoint, env2_in_acc (0.8), not the whole env


def test_generic_table_also_for_paper_datasets_covers_every_test_env(tmp_path):
    final_run(tmp_path, "erm_t2", 0.86, 0.16)
    final_run(tmp_path, "erm_t0", 0.5, 0.7, test_envs=(0,))  # Table 1 ignores it (and says so)
    tables = sweep_tables(tmp_path)
    assert tables["table1_final_step"].summary == \
        "Summary: 2 run(s) read; 1 in cells; excluded 0; 1 not in this table (test_envs [0])."
    generic = tables["ColoredMNIST_final_step"]
    assert generic.headers == ["Method", "env0", "env2", "Avg", "n"]
    # test env 0's accuracy is env0_acc of that run: 0.5 (train value of the helper), env2 of the other: 0.16
    assert generic.rows == [["ERM", "50.0 ± 0.0", "16.0 ± 0.0", "33.0", "1"]]


def test_generic_table_for_other_dataset_and_new_algorithm(tmp_path):
    _domain_sweep(tmp_path, "OfficeHome", {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.8}, algorithm="Brand_New", trials=(0,))
    table = sweep_tables(tmp_path)["OfficeHome_training_domain"]
    assert table.headers == ["Method", "env0", "env1", "env2", "env3", "Avg", "n"]
    assert table.rows == [["Brand_New", "50.0 ± 0.0", "60.0 ± 0.0", "70.0 ± 0.0", "80.0 ± 0.0", "65.0", "1"]]


def test_generic_table_row_missing_a_test_env_shows_how_many_it_has_and_no_average(tmp_path):
    final_run(tmp_path, "erm_t2", 0.86, 0.16)
    final_run(tmp_path, "erm_t0", 0.5, 0.7, test_envs=(0,))
    final_run(tmp_path, "sil_t2", 0.7, 0.7, algorithm="SIL")
    generic = sweep_tables(tmp_path)["ColoredMNIST_final_step"]
    assert generic.rows[1] == ["SIL", "—", "70.0 ± 0.0", "— (1/2 domains)", "1"]
    avg = generic.tidy[(generic.tidy["row"] == "SIL") & (generic.tidy["column"] == "Avg")].iloc[0]
    assert avg["status"] == "incomplete row" and avg["n"] == 0 and math.isnan(avg["mean"])


def test_generic_columns_carry_the_paper_domain_names_where_known():
    assert environment_labels("VLCS", [0, 3]) == ["Caltech (env 0)", "Pascal (env 3)"]
    assert environment_labels("PACS", [3]) == ["Sketch (env 3)"]
    assert environment_labels("OfficeHome", [1]) == ["env1"]


def test_domainbed_written_sweep_is_read(tmp_path):
    """DomainBed: args.hparams is a JSON string, args.steps null, no env{i}_acc, extra fields."""
    for t in range(2):
        for seed in (0, 1):
            args = {"algorithm": "ERM", "checkpoint_freq": None, "data_dir": "/d", "dataset": "RotatedMNIST",
                    "holdout_fraction": 0.2, "hparams": '{"lr": 0.001}', "hparams_seed": seed, "output_dir": "o",
                    "save_model_every_checkpoint": False, "seed": 123, "skip_model_save": False, "steps": None,
                    "task": "domain_generalization", "test_envs": [t], "trial_seed": 0, "uda_holdout_fraction": 0}
            recs = []
            for step, (val, test) in enumerate([(0.7 + 0.1 * seed, 0.3 + 0.1 * seed), (0.5, 0.9)]):
                recs.append({"step": step * 300, "epoch": 1.0, "loss": 0.2, "mem_gb": 1.0, "step_time": 0.1,
                             f"env{t}_in_acc": test, f"env{t}_out_acc": 0.0,
                             f"env{1 - t}_in_acc": 0.9, f"env{1 - t}_out_acc": val})
            write_run(tmp_path, f"hash{t}{seed}", args, recs, hparams={"lr": 0.001, "batch_size": 64})
    sweep = load_sweep(tmp_path)
    assert set(sweep.runs["config"]) == {'hparams_seed=0 hparams={"lr": 0.001} holdout=0.2',
                                         'hparams_seed=1 hparams={"lr": 0.001} holdout=0.2'}
    table = sweep_tables(tmp_path)["RotatedMNIST_training_domain"]
    # per test env: seed 1 wins (val 0.8 > 0.7), its step 0 (0.8 > 0.5): test 0.4
    assert table.rows == [["ERM", "40.0 ± 0.0 [a]", "40.0 ± 0.0 [b]", "40.0", "1"]]
    assert table.notes[0] == "[a] ERM / env0: best of 2 hyperparameter configs per trial by training-domain validation"


# ---------------------------------------------------------------- robustness

@pytest.fixture
def broken_sweep(tmp_path):
    final_run(tmp_path, "erm_ok", 0.86, 0.16, trial=0)
    final_run(tmp_path, "erm_truncated", 0.86, 0.16, trial=1, lines_after=['{"args": {"dataset": "Colo'])
    final_run(tmp_path, "erm_nan", float("nan"), 0.16, trial=2)  # json.dumps writes the NaN literal
    final_run(tmp_path, "erm_incomplete", 0.80, 0.20, trial=3, done=False)
    final_run(tmp_path, "sil_nonjson", 0.7, 0.7, algorithm="SIL", lines_after=["this is not json", "[1, 2]"])
    records = [cmnist(0, 0.5, 0.5), cmnist(1, 0.7, 0.7)]
    del records[1]["env1_in_acc"]
    write_run(tmp_path, "sil_missing_field", run_args(algorithm="SIL", trial=1), records)
    null_loss = [cmnist(0, 0.7, 0.6, loss=None)]
    write_run(tmp_path, "irm_null_loss", run_args(algorithm="IRM"), null_loss)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "results.jsonl").write_text("\x00\x01 nothing\n")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "results.jsonl").write_text("")
    return tmp_path


def test_loader_counts_every_problem_with_its_reason(broken_sweep):
    sweep = load_sweep(broken_sweep)
    excluded = sweep.runs["excluded"].to_dict()
    assert excluded == {"erm_ok": "", "erm_truncated": "malformed", "erm_nan": "diverged",
                        "erm_incomplete": "incomplete", "sil_nonjson": "malformed", "sil_missing_field": "malformed",
                        "irm_null_loss": "diverged"}
    assert sweep.runs.loc["sil_nonjson", "problems"] == "line is not a JSON object (x1); non-JSON or truncated line (x1)"
    assert sweep.runs.loc["sil_missing_field", "problems"] == "record missing env1_in_acc (x1)"
    assert dict(sweep.unreadable) == {"garbage": "non-JSON or truncated line", "empty_run": "empty file"}
    assert sweep.exclusion_counts() == {"incomplete": 1, "diverged": 2, "malformed": 3, "unreadable": 2}


def test_records_with_different_args_in_one_file_are_malformed(tmp_path):
    run_dir = final_run(tmp_path, "mixed", 0.8, 0.2)
    other = json.dumps({"args": run_args(trial=9), "hparams": {}, **cmnist(3, 0.8, 0.2)})
    with open(run_dir / "results.jsonl", "a") as f:
        f.write(other + "\n")
    sweep = load_sweep(tmp_path)
    assert sweep.runs.loc["mixed", "problems"] == "records with different args in one file (x1)"
    assert sweep.runs.loc["mixed", "excluded"] == "malformed"
    assert sweep.runs.loc["mixed", "n_records"] == 3


def test_problem_cells_are_marked_and_summary_says_why(broken_sweep):
    table = sweep_tables(broken_sweep)["table1_final_step"]
    rows = as_dict(table)
    # marks are lettered in row order: SIL, (VREx clean), IRM, ERM
    assert rows["SIL"]["Train"] == "— [a]" and rows["SIL"]["n"] == "0"
    assert rows["IRM"]["Test"] == "— [b]"
    assert rows["ERM"]["Test"] == "16.0 ± 0.0 [c]" and rows["ERM"]["n"] == "1"
    assert rows["VREx"]["Test"] == "—"
    assert table.notes == [
        "[a] SIL: 2 run(s) excluded: 2 malformed lines or fields (sil_missing_field, sil_nonjson)",
        "[b] IRM: 1 run(s) excluded: 1 diverged (null/NaN metric) (irm_null_loss)",
        "[c] ERM: 3 run(s) excluded: 1 incomplete (no done file), 1 diverged (null/NaN metric), "
        "1 malformed lines or fields (erm_incomplete, erm_nan ...)"]
    assert table.summary == ("Summary: 7 run(s) read; 1 in cells; excluded 1 incomplete (no done file), "
                             "2 diverged (null/NaN metric), 3 malformed lines or fields; 4 malformed line(s)/record(s); "
                             "2 unreadable file(s) in the sweep.")


def test_csv_carries_each_cells_note_texts(broken_sweep):
    tables, _ = build_tables(load_sweep(broken_sweep))
    csv = pd.read_csv(io.StringIO(to_csv(tables)), keep_default_na=False)
    erm = csv[(csv["table"] == "table1") & (csv["row"] == "ERM") & (csv["column"] == "Test")].iloc[0]
    assert erm["marks"] == "[c]" and erm["notes"].startswith("ERM: 3 run(s) excluded: 1 incomplete")


def test_include_incomplete_uses_incomplete_runs_and_marks_them(broken_sweep):
    table = sweep_tables(broken_sweep, include_incomplete=True)["table1_final_step"]
    rows = as_dict(table)
    assert rows["ERM"]["Test"] == "18.0 ± 2.0 [c][d]" and rows["ERM"]["n"] == "2"  # mean of 16 and 20
    assert table.notes[3] == "[d] ERM: includes 1 incomplete run(s) (--include_incomplete)"
    assert "2 in cells" in table.summary and "incomplete" not in table.summary


def test_mixed_step_counts_are_separate_configs_chosen_per_trial(tmp_path):
    final_run(tmp_path, "sil_3", 0.70, 0.60, algorithm="SIL", steps=3)
    final_run(tmp_path, "sil_5", 0.75, 0.50, algorithm="SIL", steps=5)
    table = sweep_tables(tmp_path)["table1_final_step"]
    assert as_dict(table)["SIL"]["Test"] == "50.0 ± 0.0 [a][b]"  # steps=5 has the higher training accuracy
    assert table.notes == [
        "[a] SIL: configs compared on training-split accuracy (runs have no held-out split)",
        "[b] SIL: best of 2 hyperparameter configs per trial by training-domain validation at the final step"]
    assert "1 in cells; 1 more evaluated as other configs" in table.summary


def test_duplicate_runs_of_one_config_and_trial_mark_the_cell(tmp_path):
    final_run(tmp_path, "erm_a", 0.86, 0.16)
    final_run(tmp_path, "erm_b", 0.80, 0.30)  # same args but the output dir: another restart with trial 0
    table = sweep_tables(tmp_path)["table1_final_step"]
    assert as_dict(table)["ERM"]["Test"] == "16.0 ± 0.0 [a]"
    assert table.notes == ["[a] ERM: 1 extra run(s) of the same config and trial seed (e.g. another --seed) "
                           "competed like configs instead of being averaged"]


# ---------------------------------------------------------------- formats and the CLI

def test_latex_escapes_specials_and_symbols():
    assert latex_escape("My_Alg & 50% ± 1 Δ #1 {x} ~ ^ \\") == \
        r"My\_Alg \& 50\% $\pm$ 1 $\Delta$ \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{}"


def test_cli_writes_markdown_latex_csv_and_plots(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    final_run(sweep, "erm0", 0.86, 0.16)
    final_run(sweep, "new0", 0.60, 0.60, algorithm="My_Alg")
    out = tmp_path / "out"
    rc = collect_results.main(["--input_dir", str(sweep), "--format", "markdown", "latex", "csv",
                               "--output", str(out), "--plots"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| ERM " in printed and "\\toprule" in printed and "table1,final_step,ColoredMNIST" in printed
    tex = (out / "tables.tex").read_text()
    assert tex.startswith("\\documentclass") and "My\\_Alg" in tex and "My_Alg" not in tex
    csv = pd.read_csv(out / "tables.csv")
    erm_test = csv[(csv["row"] == "ERM") & (csv["column"] == "Test")].iloc[0]
    assert (erm_test["mean"], erm_test["paper_mean"], erm_test["n"]) == (16.0, 17.1, 1)
    assert math.isclose(erm_test["diff"], -1.1) and erm_test["test_env"] == 2
    assert list(csv.columns) == ["table", "selection", "dataset", "row", "column", "test_env", "mean", "std", "n",
                                 "paper_mean", "paper_std", "diff", "marks", "status", "notes"]
    assert (out / "tables.md").read_text().startswith("### Table 1")
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["bars_ColoredMNIST_final_step.png", "bars_table1_final_step.png",
                    "curves_ColoredMNIST_env2_final_step.png"]
    if shutil.which("pdflatex"):
        done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
                              cwd=out, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-2000:]


def test_cli_quiet_needs_output_and_plots_need_output(tmp_path, capsys):
    final_run(tmp_path, "erm0", 0.86, 0.16)
    assert collect_results.main(["--input_dir", str(tmp_path), "--plots"]) == 2
    assert capsys.readouterr().err == "error: --plots writes PNG files and needs --output DIR\n"
    assert collect_results.main(["--input_dir", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: --quiet only makes sense with --output DIR")
    assert collect_results.main(["--input_dir", str(tmp_path), "--output", str(tmp_path / "o"), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and (tmp_path / "o" / "tables.md").exists()


def test_cli_nonexistent_input_dir_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "domainbed_sil.collect_results", "--input_dir", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == f"error: --input_dir {tmp_path / 'nope'} does not exist or is not a directory; expected a sweep directory\n"
    assert done.stdout == ""


def test_cli_directory_without_records_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.jsonl").write_text("not json\n")
    assert collect_results.main(["--input_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no records found under {tmp_path} (1 results.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert collect_results.main(["--input_dir", str(empty)]) == 2
    assert capsys.readouterr().err.startswith(f"error: no records found under {empty};")


def test_cli_unknown_selection_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        collect_results.main(["--input_dir", str(tmp_path), "--selection", "magic"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_latex_table_has_booktabs_rules_and_balanced_rows(tmp_path):
    final_run(tmp_path, "erm0", 0.86, 0.16)
    table = sweep_tables(tmp_path)["table1_final_step"]
    tex = to_latex(table)
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0]
    assert all(line.count("&") == len(table.headers) - 1 for line in body.strip().splitlines())


# ---------------------------------------------------------------- real runs of the harness

@pytest.mark.skipif(not (DATA / "MNIST").exists(), reason="MNIST not under DOMAINBED_SIL_DATA")
def test_real_training_runs_make_table1(tmp_path):
    env = {**os.environ, "DOMAINBED_SIL_DATA": str(DATA)}
    for algorithm in ("ERM", "SIL"):
        done = subprocess.run(
            [sys.executable, "-m", "domainbed_sil.train", "--algorithm", algorithm, "--steps", "3",
             "--checkpoint_freq", "1", "--hparams", '{"hidden_dim": 16}', "--threads", "1", "--skip_model_save",
             "--output_dir", str(tmp_path / "sweep" / algorithm)],
            capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    sweep = load_sweep(tmp_path / "sweep")
    assert list(sweep.runs["used"]) == [True, True]
    table = sweep_tables(tmp_path / "sweep")["table1_final_step"]
    rows = as_dict(table)
    for algorithm in ("ERM", "SIL"):
        last = [json.loads(l) for l in (tmp_path / "sweep" / algorithm / "results.jsonl").read_text().splitlines()][-1]
        assert last["step"] == 2
        train = 100 * (last["env0_in_acc"] + last["env1_in_acc"]) / 2
        assert rows[algorithm]["Train"] == f"{train:.1f} ± 0.0"
        assert rows[algorithm]["Test"] == f"{100 * last['env2_acc']:.1f} ± 0.0"
        assert rows[algorithm]["n"] == "1"
    assert table.summary == "Summary: 2 run(s) read; 2 in cells; excluded 0."


def test_training_domain_selection_on_runs_without_holdout_says_it_used_training_accuracy(tmp_path):
    final_run(tmp_path, "erm_t2", 0.86, 0.16)
    table = sweep_tables(tmp_path, methods=["training_domain"])["table1_training_domain"]
    assert as_dict(table)["ERM"]["Test"].endswith("[a]")
    assert table.notes == ["[a] " + TRAIN_IN_VALIDATION_NOTE]
    assert sweep_tables(tmp_path, methods=["final_step"])["table1_final_step"].notes == []
