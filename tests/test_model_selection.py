"""Selection methods on small hand-made record sets whose answers are worked out in the comments."""
import pandas as pd
import pytest

from domainbed_sil import model_selection as ms


def rec(run_id, step, test_envs=(2,), trial=0, config="c0", hparams_seed=0, n_envs=3, dataset="D", row="A", **acc):
    """One record in the shape of ``Sweep.used_records()`` (accuracies as fractions)."""
    test_envs = tuple(sorted(test_envs))
    return dict(run_id=run_id, step=step, dataset=dataset, row=row, test_envs=",".join(map(str, test_envs)),
                test_env=test_envs[0] if len(test_envs) == 1 else -1, n_test_envs=len(test_envs),
                trial_seed=trial, hparams_seed=hparams_seed, config=config, n_envs=n_envs, **acc)


def cmnist_like(run_id, step, out0, out1, test, in0=0.5, in1=0.5, **kw):
    """Three envs, test env 2; val = mean(out0, out1); test = env2_acc."""
    return rec(run_id, step, env0_in_acc=in0, env1_in_acc=in1, env2_in_acc=test, env0_out_acc=out0,
               env1_out_acc=out1, env2_out_acc=0.0, env2_acc=test, **kw)


def frame(*records):
    return pd.DataFrame(list(records))


def only(frame_, **where):
    mask = pd.Series(True, index=frame_.index)
    for key, value in where.items():
        mask &= frame_[key] == value
    assert mask.sum() == 1, frame_
    return frame_[mask].iloc[0]


def test_training_domain_picks_checkpoint_with_best_mean_training_out_accuracy():
    records = frame(
        cmnist_like("r", 0, 0.6, 0.8, test=0.5),              # val 0.70
        cmnist_like("r", 1, 0.9, 0.7, test=0.3, in0=0.8, in1=0.6),  # val 0.80 <- best, earliest
        cmnist_like("r", 2, 0.8, 0.8, test=0.9),              # val 0.80 (tie, later step loses)
    )
    cand = ms.training_domain(records).candidates
    row = only(cand, run_id="r")
    assert row["step"] == 1
    assert row["val_acc"] == pytest.approx(0.8)
    assert row["test_acc"] == pytest.approx(0.3)
    assert row["train_acc"] == pytest.approx(0.7)  # mean of env0_in 0.8 and env1_in 0.6; env2 never counts
    assert row["val_source"] == "train_out"


def test_config_best_on_validation_wins_even_when_another_is_better_on_test():
    records = frame(
        # trial 0: c0 val 0.80 test 0.30; c1 val 0.70 test 0.90 -> c0 (0.30)
        cmnist_like("t0c0", 0, 0.8, 0.8, test=0.3, trial=0, config="c0", hparams_seed=0),
        cmnist_like("t0c1", 0, 0.7, 0.7, test=0.9, trial=0, config="c1", hparams_seed=1),
        # trial 1: c0 val 0.60 test 0.50; c1 val 0.75 test 0.70 -> c1 (0.70)
        cmnist_like("t1c0", 0, 0.6, 0.6, test=0.5, trial=1, config="c0", hparams_seed=0),
        cmnist_like("t1c1", 0, 0.75, 0.75, test=0.7, trial=1, config="c1", hparams_seed=1),
    )
    cells, chosen, failures = ms.run_selection(records, "training_domain")
    assert sorted(chosen["run_id"]) == ["t0c0", "t1c1"]
    assert set(chosen["n_configs"]) == {2}
    cell = only(cells, test_env=2)
    assert cell["test_mean"] == pytest.approx(50.0)
    assert cell["test_std"] == pytest.approx(20.0)  # population std of {30, 70}; the sample std would be 28.3
    assert cell["n"] == 2
    assert failures.empty


def test_tied_configs_resolve_to_lowest_hparams_seed_regardless_of_order():
    records = frame(
        cmnist_like("b", 0, 0.8, 0.8, test=0.2, config="zz", hparams_seed=5),
        cmnist_like("a", 0, 0.8, 0.8, test=0.6, config="aa", hparams_seed=7),
        cmnist_like("c", 0, 0.8, 0.8, test=0.9, config="mm", hparams_seed=3),
    )
    for order in (records, records.iloc[::-1]):
        _, chosen, _ = ms.run_selection(order, "training_domain")
        assert list(chosen["run_id"]) == ["c"]


def test_two_runs_of_one_config_and_trial_are_counted_as_duplicates_not_hidden():
    records = frame(
        cmnist_like("seed1", 0, 0.8, 0.8, test=0.3),
        cmnist_like("seed2", 0, 0.7, 0.7, test=0.9),  # same trial and config, another --seed
    )
    cells, chosen, _ = ms.run_selection(records, "final_step")
    assert list(chosen["run_id"]) == ["seed1"]
    assert (chosen["n_configs"].iloc[0], chosen["n_duplicates"].iloc[0]) == (1, 1)
    assert only(cells, test_env=2)["n_duplicates"] == 1


def test_training_domain_without_out_split_scores_on_training_in_accuracy_and_says_so():
    records = frame(
        rec("r", 0, env0_in_acc=0.9, env1_in_acc=0.7, env2_in_acc=0.2),  # val 0.8
        rec("r", 1, env0_in_acc=0.6, env1_in_acc=0.6, env2_in_acc=0.5),  # val 0.6
    )
    row = only(ms.training_domain(records).candidates, run_id="r")
    assert (row["step"], row["val_source"]) == (0, "train_in")
    assert row["test_acc"] == pytest.approx(0.2)  # no env2_acc column: falls back to env2_in_acc


def test_final_step_takes_last_checkpoint_whatever_its_validation():
    records = frame(
        cmnist_like("r", 0, 0.99, 0.99, test=0.9),
        cmnist_like("r", 4, 0.10, 0.10, test=0.4, in0=0.87, in1=0.88),
        cmnist_like("r", 2, 0.50, 0.50, test=0.6),
    )
    row = only(ms.final_step(records).candidates, run_id="r")
    assert (row["step"], row["test_acc"]) == (4, pytest.approx(0.4))
    assert row["train_acc"] == pytest.approx(0.875)


def test_test_env_whole_accuracy_is_preferred_over_in_split():
    records = frame(rec("r", 0, env0_in_acc=0.5, env1_in_acc=0.5, env2_in_acc=0.1, env2_acc=0.7))
    assert only(ms.final_step(records).candidates, run_id="r")["test_acc"] == pytest.approx(0.7)


def test_oracle_uses_last_checkpoint_test_out_split_and_reports_test_in_split():
    def orc(run_id, step, out2, in2, **kw):
        return rec(run_id, step, env0_in_acc=0.5, env1_in_acc=0.5, env0_out_acc=0.5, env1_out_acc=0.5,
                   env2_in_acc=in2, env2_out_acc=out2, env2_acc=0.0, **kw)

    records = frame(
        orc("c0", 0, out2=0.99, in2=0.99, config="c0"),  # not the last checkpoint: ignored
        orc("c0", 1, out2=0.60, in2=0.55, config="c0"),
        orc("c1", 1, out2=0.70, in2=0.40, config="c1", hparams_seed=1),  # best out2 -> report in2 0.40
    )
    cells, chosen, _ = ms.run_selection(records, "oracle")
    assert list(chosen["run_id"]) == ["c1"]
    assert only(cells, test_env=2)["test_mean"] == pytest.approx(40.0)


def test_oracle_without_test_out_split_is_a_failure_with_reason():
    sel = ms.oracle(frame(rec("r", 0, env0_in_acc=0.5, env1_in_acc=0.5, env2_in_acc=0.5)))
    assert sel.candidates.empty
    assert len(sel.failures) == 1
    assert "needs a held-out split of the test env" in sel.failures["reason"].iloc[0]


def _lodo_config(config, hparams_seed, tests, val01, val02, extra_pairs=True):
    """Test env 0 of three envs.  Test run accuracies ``tests`` per step; pair (0,1) gives env1's
    held-out accuracy ``val01`` per step, pair (0,2) env2's ``val02`` per step."""
    out = []
    for step, acc in enumerate(tests):
        out.append(rec(f"{config}-t0", step, test_envs=(0,), config=config, hparams_seed=hparams_seed,
                       env0_in_acc=acc, env1_in_acc=0.9, env2_in_acc=0.9))
    for step, acc in enumerate(val01):
        out.append(rec(f"{config}-p01", step, test_envs=(0, 1), config=config, hparams_seed=hparams_seed,
                       env0_in_acc=0.11, env1_in_acc=0.0, env1_acc=acc, env2_in_acc=0.5))
    if extra_pairs:
        for step, acc in enumerate(val02):
            out.append(rec(f"{config}-p02", step, test_envs=(0, 2), config=config, hparams_seed=hparams_seed,
                           env0_in_acc=0.12, env1_in_acc=0.5, env2_in_acc=0.0, env2_acc=acc))
    return out


def test_leave_one_out_selects_step_and_config_on_held_out_pair_accuracy():
    records = frame(
        # c0: step vals (0.7+0.8)/2 = 0.75 and (0.9+0.6)/2 = 0.75 -> tie, step 0, test 0.5
        *_lodo_config("c0", 0, tests=[0.5, 0.6], val01=[0.7, 0.9], val02=[0.8, 0.6]),
        # c1: vals 0.90 and 0.925 -> step 1, test 0.3; c1 beats c0 (0.925 > 0.75)
        *_lodo_config("c1", 1, tests=[0.2, 0.3], val01=[0.9, 0.9], val02=[0.9, 0.95]),
    )
    sel = ms.leave_one_out(records)
    c0 = only(sel.candidates, config="c0")
    assert (c0["step"], c0["val_acc"], c0["test_acc"]) == (0, pytest.approx(0.75), pytest.approx(0.5))
    cells, chosen, failures = ms.run_selection(records, "leave_one_out")
    assert list(chosen["run_id"]) == ["c1-t0"]
    assert list(chosen["step"]) == [1]
    assert only(cells, test_env=0)["test_mean"] == pytest.approx(30.0)
    assert failures.empty


def test_leave_one_out_missing_pair_run_is_named_and_other_configs_still_count():
    records = frame(
        *_lodo_config("c0", 0, tests=[0.5], val01=[0.7], val02=[0.8]),
        *_lodo_config("c2", 2, tests=[0.99], val01=[0.99], val02=[], extra_pairs=False),
    )
    cells, chosen, failures = ms.run_selection(records, "leave_one_out")
    assert list(chosen["run_id"]) == ["c0-t0"]  # c2 would win on val and test but cannot be scored
    assert list(failures["config"]) == ["c2"]
    assert failures["reason"].iloc[0] == "missing pair run(s) test_envs=[0, 2]"
    assert only(cells, test_env=0)["test_mean"] == pytest.approx(50.0)


def test_leave_one_out_cell_with_no_pairs_at_all_has_no_value_only_a_reason():
    records = frame(rec("solo", 0, test_envs=(1,), env0_in_acc=0.5, env1_in_acc=0.5, env2_in_acc=0.5))
    cells, chosen, failures = ms.run_selection(records, "leave_one_out")
    assert cells.empty and chosen.empty
    assert failures["reason"].iloc[0] == "missing pair run(s) test_envs=[1, 0], test_envs=[1, 2]"


def test_leave_one_out_pair_steps_must_match_test_run_steps():
    records = frame(*_lodo_config("c0", 0, tests=[0.5], val01=[0.7], val02=[0.8]))
    records.loc[records["run_id"] == "c0-p02", "step"] = 7  # pair (0,2) checkpointed at other steps
    sel = ms.leave_one_out(records)
    assert sel.candidates.empty
    assert sel.failures["reason"].iloc[0] == "pair runs share no checkpoint step with the test run"


def test_selection_ignores_runs_with_two_test_envs_except_leave_one_out():
    records = frame(*_lodo_config("c0", 0, tests=[0.5], val01=[0.7], val02=[0.8]))
    for method in ("training_domain", "final_step", "oracle"):
        _, chosen, _ = ms.run_selection(records, method)
        assert set(chosen["run_id"]) <= {"c0-t0"}


def test_aggregate_groups_cells_per_dataset_row_and_test_env():
    records = frame(
        cmnist_like("a0", 0, 0.5, 0.5, test=0.2, row="A", trial=0),
        cmnist_like("a1", 0, 0.5, 0.5, test=0.4, row="A", trial=1),
        cmnist_like("b0", 0, 0.5, 0.5, test=0.9, row="B", trial=0),
    )
    cells, _, _ = ms.run_selection(records, "final_step")
    a, b = only(cells, row="A"), only(cells, row="B")
    assert (a["test_mean"], a["test_std"], a["n"]) == (pytest.approx(30.0), pytest.approx(10.0), 2)
    assert (b["test_mean"], b["test_std"], b["n"]) == (pytest.approx(90.0), 0.0, 1)
    assert a["run_ids"] == ("a0", "a1")


def test_unknown_selection_method_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match="training_domain"):
        ms.run_selection(frame(cmnist_like("r", 0, 0.5, 0.5, test=0.5)), "best_guess")


def test_empty_records_give_empty_results_for_every_method():
    empty = frame(rec("r", 0, env0_in_acc=0.5, env1_in_acc=0.5, env2_in_acc=0.5)).iloc[:0]
    for method in ms.SELECTION_METHODS:
        cells, chosen, failures = ms.run_selection(empty, method)
        assert cells.empty and chosen.empty and failures.empty, method
