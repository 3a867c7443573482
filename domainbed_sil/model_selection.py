"""Model selection over a DataFrame of records: pure, vectorized functions.

Input: one row per record (checkpoint) with the run's identity columns, as returned by
``records.Sweep.used_records()``: ``run_id, step, dataset, row, test_env, test_envs, n_test_envs,
trial_seed, hparams_seed, config, n_envs`` and accuracy columns ``env{i}_in_acc``,
``env{i}_out_acc``, ``env{i}_acc`` (fractions in [0, 1]).

Definitions (t = the test environment of a run with one test environment):

- train accuracy of a record = mean over training envs i != t of ``env{i}_in_acc``;
- held-out accuracy of env i = ``env{i}_acc`` (whole environment) if present, else ``env{i}_in_acc``;
- test accuracy = held-out accuracy of t, except for the oracle (below).

Each method maps records to *candidates*: one per (dataset, row, test_env, trial_seed, config)
with the chosen ``step``, a ``val_acc`` (what selection maximises) and the ``test_acc`` /
``train_acc`` at that step.  :func:`select_configs` then keeps, per (dataset, row, test_env,
trial_seed), the candidate with the highest ``val_acc`` (the hyperparameter choice), and
:func:`aggregate` gives mean / population std / n over trial seeds.

Methods (DomainBed's semantics, with the documented deviations):

- ``training_domain``: per run, the checkpoint with the highest mean ``env{i}_out_acc`` over
  training envs.  A run without out-splits (holdout_fraction 0) is scored on its training
  envs' ``in`` accuracy instead, and the candidate says so (``val_source = "train_in"``).
- ``leave_one_out``: for test env t and config c, at each step s the validation score is the
  mean over every other env v of the held-out accuracy of env v in the run with
  ``test_envs = {t, v}`` (same trial, config, step s); the test run (``test_envs = [t]``) gives
  the test accuracy at the step with the best score.  A step lacking any pair run does not
  count; a config with no complete step is a failure naming the missing pair(s).
- ``oracle``: the last checkpoint of each run; configs compared on ``env{t}_out_acc``; the
  reported accuracy is ``env{t}_in_acc`` (the part of the test env not used to select).
  A run without ``env{t}_out_acc`` is a failure.
- ``final_step``: the last checkpoint of each run (no early stopping); configs compared as in
  ``training_domain`` (at the last checkpoint).

Ties: within a run the earliest step wins; across configs the lowest ``hparams_seed``, then
the config label, then the run id (deterministic, independent of file order).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np
import pandas as pd

from domainbed_sil.records import env_matrix, pick_per_row

CELL_KEYS = ["dataset", "row", "test_env"]
TRIAL_KEYS = CELL_KEYS + ["trial_seed"]
CANDIDATE_KEYS = TRIAL_KEYS + ["config"]
CANDIDATE_COLUMNS = CANDIDATE_KEYS + ["hparams_seed", "run_id", "step", "val_acc", "test_acc", "train_acc", "val_source"]
FAILURE_COLUMNS = CANDIDATE_KEYS + ["reason"]


@dataclass
class Selection:
    """Output of a selection method: candidates (see module docstring) and failures with reasons."""

    candidates: pd.DataFrame
    failures: pd.DataFrame


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Row means ignoring NaN; NaN where a row has no value (no warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return np.nanmean(values, axis=1) if values.shape[1] else np.full(len(values), np.nan)


def with_accuracies(records: pd.DataFrame) -> pd.DataFrame:
    """Records of single-test-env runs plus ``train_acc``, ``train_val_acc``, ``heldout_test_acc``,
    ``test_in_acc`` and ``test_out_acc`` columns (fractions)."""
    frame = records[records["n_test_envs"] == 1]
    n = int(frame["n_envs"].max()) if len(frame) else 0
    in_m, out_m, whole = (env_matrix(frame, kind, n) for kind in ("in", "out", "whole"))
    heldout = np.where(np.isnan(whole), in_m, whole)
    test_env = frame["test_env"].to_numpy(dtype=int)
    train_mask = np.ones((len(frame), n), dtype=bool)
    ok = (test_env >= 0) & (test_env < n)
    train_mask[np.nonzero(ok)[0], test_env[ok]] = False
    return frame.assign(
        train_acc=_nanmean(np.where(train_mask, in_m, np.nan)),
        train_val_acc=_nanmean(np.where(train_mask, out_m, np.nan)),
        heldout_test_acc=pick_per_row(heldout, test_env),
        test_in_acc=pick_per_row(in_m, test_env),
        test_out_acc=pick_per_row(out_m, test_env),
    )


def _empty_failures() -> pd.DataFrame:
    return pd.DataFrame(columns=FAILURE_COLUMNS)


def _split_failures(cands: pd.DataFrame, checks: List[tuple]) -> Selection:
    """Move candidates failing a check (mask column, reason) into failures; first failing reason wins."""
    failed = np.zeros(len(cands), dtype=bool)
    failures = []
    for mask, reason in checks:
        mask = np.asarray(mask) & ~failed
        if mask.any():
            failures.append(cands.loc[mask, CANDIDATE_KEYS].assign(reason=reason))
        failed |= mask
    good = cands.loc[~failed, CANDIDATE_COLUMNS].reset_index(drop=True)
    fail = pd.concat(failures, ignore_index=True) if failures else _empty_failures()
    return Selection(good, fail)


def _best_per(frame: pd.DataFrame, keys: List[str], score: str, tie_columns: List[str]) -> pd.DataFrame:
    """Per group of ``keys`` the row with the highest ``score`` (NaN last), ties by ``tie_columns`` ascending."""
    ordered = frame.sort_values(keys + [score] + tie_columns, ascending=[True] * len(keys) + [False] + [True] * len(tie_columns),
                                na_position="last", kind="mergesort")
    return ordered.drop_duplicates(keys, keep="first")


def _last_checkpoint(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["run_id", "step"], kind="mergesort").drop_duplicates("run_id", keep="last")


def _iid_val(frame: pd.DataFrame) -> pd.DataFrame:
    """``val_acc``: training envs' out accuracy, or their in accuracy when the run has no out-split."""
    no_out = frame["train_val_acc"].isna()
    return frame.assign(
        val_acc=frame["train_val_acc"].where(~no_out, frame["train_acc"]),
        val_source=np.where(no_out, "train_in", "train_out"),
    )


def _test_missing(cands: pd.DataFrame, column: str = "test_acc") -> tuple:
    return (cands[column].isna().to_numpy(), "no accuracy recorded for the test environment")


def training_domain(records: pd.DataFrame) -> Selection:
    """Training-domain validation (see module docstring)."""
    frame = _iid_val(with_accuracies(records))
    frame = frame.assign(test_acc=frame["heldout_test_acc"])
    best = _best_per(frame, ["run_id"], "val_acc", ["step"])
    return _split_failures(best, [_test_missing(best)])


def final_step(records: pd.DataFrame) -> Selection:
    """The last checkpoint of each run; configs compared by training-domain validation there."""
    frame = _iid_val(_last_checkpoint(with_accuracies(records)))
    frame = frame.assign(test_acc=frame["heldout_test_acc"])
    return _split_failures(frame, [_test_missing(frame)])


def oracle(records: pd.DataFrame) -> Selection:
    """Test-domain validation (oracle): last checkpoint, configs compared on ``env{t}_out_acc``."""
    frame = _last_checkpoint(with_accuracies(records))
    frame = frame.assign(val_acc=frame["test_out_acc"], test_acc=frame["test_in_acc"], val_source="test_out")
    return _split_failures(frame, [
        (frame["test_out_acc"].isna().to_numpy(), "no env{t}_out_acc: the oracle needs a held-out split of the test env (holdout_fraction > 0)"),
        _test_missing(frame),
    ])


def _pair_validation(records: pd.DataFrame) -> pd.DataFrame:
    """Held-out accuracies of runs with two test envs, one row per (pair run record, role).

    A run with ``test_envs = {a, b}`` validates test env a on env b and test env b on env a.
    Columns: dataset, row, trial_seed, config, step, test_env, val_env, val.
    """
    pairs = records[records["n_test_envs"] == 2]
    columns = ["dataset", "row", "trial_seed", "config", "step", "test_env", "val_env", "val"]
    if not len(pairs):
        return pd.DataFrame(columns=columns)
    envs = pairs["test_envs"].str.split(",", expand=True).astype(int).to_numpy()
    n = int(pairs["n_envs"].max())
    in_m, whole = env_matrix(pairs, "in", n), env_matrix(pairs, "whole", n)
    heldout = np.where(np.isnan(whole), in_m, whole)
    base = pairs[["dataset", "row", "trial_seed", "config", "step"]]
    roles = [base.assign(test_env=envs[:, a], val_env=envs[:, b], val=pick_per_row(heldout, envs[:, b]))
             for a, b in ((0, 1), (1, 0))]
    out = pd.concat(roles, ignore_index=True)
    # duplicate pair runs (same keys) would double-count an env: keep one, deterministically
    return out.sort_values(columns[:-1], kind="mergesort").drop_duplicates(columns[:-1], keep="first")


def leave_one_out(records: pd.DataFrame) -> Selection:
    """Leave-one-domain-out validation (see module docstring)."""
    single = with_accuracies(records)
    single = single.assign(test_acc=single["heldout_test_acc"], val_source="leave_one_out")
    pairs = _pair_validation(records)
    step_keys = ["dataset", "row", "trial_seed", "config", "test_env", "step"]
    per_step = (pairs.dropna(subset=["val"]).groupby(step_keys, sort=False)
                .agg(val_acc=("val", "mean"), n_val=("val_env", "nunique")).reset_index())
    merged = single.merge(per_step, on=step_keys, how="left")
    complete = merged["n_val"].to_numpy() == merged["n_envs"].to_numpy() - 1
    usable = merged[complete]
    best = _best_per(usable, ["run_id"], "val_acc", ["step"])
    selection = _split_failures(best, [_test_missing(best)])

    # configs (test runs) with no complete step: say which pair runs are missing
    keys = CANDIDATE_KEYS
    has_candidate = set(map(tuple, best[keys].itertuples(index=False)))
    missing_rows = []
    present = pairs.groupby(["dataset", "row", "trial_seed", "config", "test_env"])["val_env"].agg(set).to_dict()
    for rec in single.drop_duplicates("run_id")[keys + ["n_envs"]].itertuples(index=False):
        key = tuple(rec[:len(keys)])
        if key in has_candidate:
            continue
        dataset, row, test_env, trial_seed, config, n_envs = rec
        have = present.get((dataset, row, trial_seed, config, test_env), set())
        absent = sorted(set(range(n_envs)) - {test_env} - have)
        if absent:
            reason = "missing pair run(s) " + ", ".join(f"test_envs=[{test_env}, {v}]" for v in absent)
        else:
            reason = "pair runs share no checkpoint step with the test run"
        missing_rows.append(dict(zip(keys, key), reason=reason))
    if missing_rows:
        selection.failures = pd.concat([selection.failures, pd.DataFrame(missing_rows)], ignore_index=True)
    return selection


SELECTION_METHODS: Dict[str, Callable[[pd.DataFrame], Selection]] = {
    "training_domain": training_domain,
    "leave_one_out": leave_one_out,
    "oracle": oracle,
    "final_step": final_step,
}
SELECTION_TITLES: Dict[str, str] = {
    "training_domain": "training-domain validation",
    "leave_one_out": "leave-one-domain-out validation",
    "oracle": "test-domain validation (oracle)",
    "final_step": "final step",
}


def select_configs(candidates: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, row, test_env, trial_seed) the candidate with the best ``val_acc``.

    Adds ``n_configs`` (how many configs competed) and ``n_duplicates`` (extra runs of one
    config in this trial, e.g. started with another ``--seed``: they compete like configs
    instead of being averaged, and the tables say so).  Ties: lowest hparams_seed, config, run_id.
    """
    if not len(candidates):
        return candidates.assign(n_configs=pd.Series(dtype=int), n_duplicates=pd.Series(dtype=int))
    grouped = candidates.groupby(TRIAL_KEYS, sort=False)
    counts = pd.DataFrame({"n_configs": grouped["config"].nunique(), "n_runs": grouped["run_id"].nunique()})
    counts["n_duplicates"] = counts["n_runs"] - counts["n_configs"]
    best = _best_per(candidates, TRIAL_KEYS, "val_acc", ["hparams_seed", "config", "run_id"])
    return best.join(counts[["n_configs", "n_duplicates"]], on=TRIAL_KEYS).reset_index(drop=True)


def aggregate(chosen: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, row, test_env): mean and population std (ddof 0) over trial seeds, in percent.

    Columns: test_mean, test_std, train_mean, train_std, n, n_configs (max over trials),
    n_duplicates (sum over trials), val_sources (sorted tuple), run_ids (tuple of the runs used).
    """
    columns = CELL_KEYS + ["test_mean", "test_std", "train_mean", "train_std", "n", "n_configs", "n_duplicates",
                           "val_sources", "run_ids"]
    if not len(chosen):
        return pd.DataFrame(columns=columns)
    frame = chosen.assign(test_pct=chosen["test_acc"] * 100.0, train_pct=chosen["train_acc"] * 100.0)
    grouped = frame.groupby(CELL_KEYS, sort=True)
    out = grouped.agg(
        test_mean=("test_pct", "mean"),
        test_std=("test_pct", lambda s: float(np.std(s.to_numpy(), ddof=0))),
        train_mean=("train_pct", "mean"),
        train_std=("train_pct", lambda s: float(np.std(s.to_numpy(), ddof=0))),
        n=("trial_seed", "nunique"),
        n_configs=("n_configs", "max"),
        n_duplicates=("n_duplicates", "sum"),
        val_sources=("val_source", lambda s: tuple(sorted(set(s)))),
        run_ids=("run_id", lambda s: tuple(sorted(s))),
    ).reset_index()
    return out[columns]


def run_selection(records: pd.DataFrame, method: str) -> tuple:
    """(aggregated cells, chosen candidates, failures) for ``method`` (a SELECTION_METHODS name)."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; expected one of {', '.join(SELECTION_METHODS)}")
    selection = SELECTION_METHODS[method](records)
    chosen = select_configs(selection.candidates)
    return aggregate(chosen), chosen, selection.failures
