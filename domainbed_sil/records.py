"""Load every ``results.jsonl`` below a directory into pandas, and account for every line.

A *run* is one ``results.jsonl`` file (one run directory).  :func:`load_sweep` returns a
:class:`Sweep` holding

- ``runs``: one row per run (identity from the first valid record's ``args`` and ``hparams``,
  completion, problems, and whether it is used);
- ``records``: one row per valid record (``run_id``, ``step``, the numeric metrics
  ``env{i}_in_acc`` / ``env{i}_out_acc`` / ``env{i}_acc`` in [0, 1], ``loss``, ``penalty`` ...);
- ``unreadable``: files from which not one record could be identified.

Reads sweeps written by this harness and by DomainBed (same field names; DomainBed's
``args.hparams`` is a JSON string and ``args.steps`` may be null).

Exclusion rules (every excluded run is counted with its reason; the tables mark the cells
it belonged to):

- ``incomplete``: no ``done`` file (unless ``include_incomplete``; then used and marked);
- ``diverged``: a null / NaN accuracy, loss, nll or penalty in any record;
- ``malformed``: a non-JSON or non-object line, a record missing ``step`` / ``args`` fields,
  a record missing an accuracy field that other records of the run have, or records of one
  file that disagree on ``args``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from domainbed_sil.paper_results import GRAYSCALE_ORACLE

RESULTS = "results.jsonl"  # same name as run_files.RESULTS; not imported to keep torch out of the collector
DONE = "done"
ACC_FIELD = re.compile(r"^env(\d+)_(in_|out_)?acc$")
# fields whose null / NaN value means the run diverged
_DIVERGENCE_FIELDS = ("loss", "nll", "penalty")
_REQUIRED_ARGS = ("dataset", "algorithm", "test_envs", "trial_seed")

INCOMPLETE = "incomplete"
DIVERGED = "diverged"
MALFORMED = "malformed"
EXCLUSION_REASONS = (INCOMPLETE, DIVERGED, MALFORMED)


def row_name(algorithm: str, hparams: Optional[Dict[str, Any]]) -> str:
    """The table row of a run: the algorithm's name, or the grayscale oracle (ERM on grayscale)."""
    if algorithm == "ERM" and isinstance(hparams, dict) and hparams.get("grayscale_model") is True:
        return GRAYSCALE_ORACLE
    return algorithm


def _is_bad_number(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _normalize_overrides(overrides: Any) -> Optional[str]:
    """``args.hparams`` as canonical JSON (DomainBed stores a JSON string, we store an object)."""
    if overrides in (None, "", {}):
        return None
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError:
            return overrides
    return json.dumps(overrides, sort_keys=True)


def config_label(hparams_seed: int, overrides: Optional[str], steps: Optional[int], holdout: Optional[float]) -> str:
    """A hyperparameter configuration: everything that defines a run except seeds and test envs.

    Runs of one configuration across trial seeds and test environments share this label, so
    leave-one-out pairs and restarts meet on it.  The resolved ``hparams`` dict is *not* the
    key: random draws depend on the trial seed.
    """
    parts = [f"hparams_seed={hparams_seed}"]
    if overrides:
        parts.append(f"hparams={overrides}")
    if steps is not None:
        parts.append(f"steps={steps}")
    if holdout is not None:
        parts.append(f"holdout={holdout:g}")
    return " ".join(parts)


@dataclass
class _RunParse:
    """What one results.jsonl yields: its valid records and the problems found."""

    records: List[Dict[str, Any]] = field(default_factory=list)
    args: Optional[Dict[str, Any]] = None
    hparams: Optional[Dict[str, Any]] = None
    problems: Dict[str, int] = field(default_factory=dict)  # detail -> count
    diverged: int = 0

    def problem(self, detail: str) -> None:
        self.problems[detail] = self.problems.get(detail, 0) + 1


def _args_problem(args: Any) -> Optional[str]:
    if not isinstance(args, dict):
        return "record without args"
    for key in _REQUIRED_ARGS:
        if key not in args:
            return f"record missing args.{key}"
    test_envs = args["test_envs"]
    if not isinstance(test_envs, list) or not test_envs or not all(isinstance(t, int) for t in test_envs):
        return "args.test_envs is not a non-empty list of integers"
    return None


def parse_results_file(path: Path) -> _RunParse:
    """Parse one results.jsonl; never raises on bad content (problems are counted instead)."""
    parsed = _RunParse()
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        parsed.problem(f"unreadable file ({err.strerror})")
        return parsed
    acc_keys_seen: List[frozenset] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            parsed.problem("non-JSON or truncated line")
            continue
        if not isinstance(rec, dict):
            parsed.problem("line is not a JSON object")
            continue
        args = rec.pop("args", None)
        hparams = rec.pop("hparams", None)
        problem = _args_problem(args)
        if problem is None and not isinstance(rec.get("step"), int):
            problem = "record missing step"
        if problem is not None:
            parsed.problem(problem)
            continue
        if parsed.args is None:
            parsed.args, parsed.hparams = args, hparams
        elif args != parsed.args:
            parsed.problem("records with different args in one file")
            continue
        acc_keys = frozenset(k for k in rec if ACC_FIELD.match(k))
        acc_keys_seen.append(acc_keys)
        if any(_is_bad_number(rec[k]) for k in acc_keys) or any(
            k in rec and _is_bad_number(rec[k]) for k in _DIVERGENCE_FIELDS
        ):
            parsed.diverged += 1
        parsed.records.append(rec)
    if acc_keys_seen:
        union = frozenset().union(*acc_keys_seen)
        for keys in acc_keys_seen:
            if keys != union:
                parsed.problem("record missing " + ", ".join(sorted(union - keys)))
    return parsed


@dataclass
class Sweep:
    """Everything read from a sweep directory (see module docstring)."""

    input_dir: Path
    runs: pd.DataFrame
    records: pd.DataFrame
    unreadable: List[Tuple[str, str]]
    include_incomplete: bool = False

    def used_records(self) -> pd.DataFrame:
        """Records of used runs joined with their run's identity columns (what selection reads)."""
        used = self.runs[self.runs["used"]]
        meta = used[RUN_META_COLUMNS]
        recs = self.records[self.records["run_id"].isin(used.index)]
        return recs.join(meta, on="run_id")

    def exclusion_counts(self) -> Dict[str, int]:
        """Reason -> number of runs excluded for it (plus ``unreadable`` files)."""
        counts = {reason: int((self.runs["excluded"] == reason).sum()) for reason in EXCLUSION_REASONS}
        counts["unreadable"] = len(self.unreadable)
        return {k: v for k, v in counts.items() if v}


RUN_META_COLUMNS = ["dataset", "algorithm", "row", "test_env", "test_envs", "n_test_envs", "trial_seed",
                    "hparams_seed", "config", "n_envs", "done"]


def _run_row(run_id: str, parsed: _RunParse, done: bool) -> Dict[str, Any]:
    args = parsed.args
    test_envs = tuple(sorted(args["test_envs"]))
    steps = args.get("steps")
    holdout = args.get("holdout_fraction")
    hparams_seed = args.get("hparams_seed") if isinstance(args.get("hparams_seed"), int) else 0
    overrides = _normalize_overrides(args.get("hparams"))
    env_ids = {int(ACC_FIELD.match(k).group(1)) for rec in parsed.records[:1] for k in rec if ACC_FIELD.match(k)}
    return {
        "run_id": run_id,
        "dataset": str(args["dataset"]),
        "algorithm": str(args["algorithm"]),
        "row": row_name(str(args["algorithm"]), parsed.hparams),
        "test_envs": ",".join(map(str, test_envs)),
        "test_env": test_envs[0] if len(test_envs) == 1 else -1,
        "n_test_envs": len(test_envs),
        "trial_seed": int(args["trial_seed"]),
        "hparams_seed": hparams_seed,
        "seed": args.get("seed"),
        "steps": steps if isinstance(steps, int) else None,
        "config": config_label(hparams_seed, overrides, steps if isinstance(steps, int) else None,
                               holdout if isinstance(holdout, (int, float)) else None),
        "n_envs": max(env_ids) + 1 if env_ids else 0,
        "done": done,
        "n_records": len(parsed.records),
        "last_step": max(r["step"] for r in parsed.records),
        "n_malformed": sum(parsed.problems.values()),
        "problems": "; ".join(f"{detail} (x{n})" for detail, n in sorted(parsed.problems.items())),
        "n_diverged_records": parsed.diverged,
    }


def load_sweep(input_dir: Path, include_incomplete: bool = False) -> Sweep:
    """Read every results.jsonl below ``input_dir`` (recursively).

    Raises FileNotFoundError when ``input_dir`` is not a directory.  Returns a Sweep whose
    ``runs`` may be empty (the caller decides whether that is an error).
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"input directory {input_dir} does not exist or is not a directory")
    run_rows: List[Dict[str, Any]] = []
    record_blocks: List[Dict[str, Any]] = []
    unreadable: List[Tuple[str, str]] = []
    for path in sorted(input_dir.rglob(RESULTS)):
        run_id = str(path.parent.relative_to(input_dir)) or "."
        parsed = parse_results_file(path)
        if parsed.args is None:
            reasons = "; ".join(parsed.problems) or "empty file"
            unreadable.append((run_id, reasons))
            continue
        run_rows.append(_run_row(run_id, parsed, (path.parent / DONE).exists()))
        for rec in parsed.records:
            rec["run_id"] = run_id
        record_blocks.extend(parsed.records)

    runs = pd.DataFrame(run_rows, columns=None if run_rows else ["run_id"] + RUN_META_COLUMNS)
    if run_rows:
        runs = runs.set_index("run_id", drop=False)
        runs.index.name = None
        runs["excluded"] = _exclusion_reason(runs, include_incomplete)
        runs["used"] = runs["excluded"] == ""
    else:
        runs = runs.assign(excluded=pd.Series(dtype=str), used=pd.Series(dtype=bool))
    records = pd.DataFrame.from_records(record_blocks) if record_blocks else pd.DataFrame(columns=["run_id", "step"])
    for column in records.columns:
        if ACC_FIELD.match(column) or column in _DIVERGENCE_FIELDS:
            records[column] = pd.to_numeric(records[column], errors="coerce")
    return Sweep(input_dir, runs, records, unreadable, include_incomplete)


def _exclusion_reason(runs: pd.DataFrame, include_incomplete: bool) -> pd.Series:
    """Per run: "" (used) or the first applicable reason in the order malformed, diverged, incomplete."""
    reason = pd.Series("", index=runs.index, dtype=object)
    if not include_incomplete:
        reason[~runs["done"]] = INCOMPLETE
    reason[runs["n_diverged_records"] > 0] = DIVERGED
    reason[runs["n_malformed"] > 0] = MALFORMED
    return reason


def accuracy_columns(frame: pd.DataFrame, kind: str) -> Dict[int, str]:
    """env index -> column name for ``kind`` in {"in", "out", "whole"} present in ``frame``."""
    suffix = {"in": "in_", "out": "out_", "whole": None}[kind]
    found = {}
    for column in frame.columns:
        m = ACC_FIELD.match(str(column))
        if m and m.group(2) == suffix:
            found[int(m.group(1))] = column
    return dict(sorted(found.items()))


def env_matrix(frame: pd.DataFrame, kind: str, n_envs: int) -> np.ndarray:
    """(len(frame), n_envs) float array of ``kind`` accuracies; NaN where the column is absent."""
    out = np.full((len(frame), n_envs), np.nan)
    for env, column in accuracy_columns(frame, kind).items():
        if env < n_envs:
            out[:, env] = frame[column].to_numpy(dtype=float)
    return out


def pick_per_row(matrix: np.ndarray, env: Sequence[int]) -> np.ndarray:
    """``matrix[r, env[r]]`` for every row r (NaN where env[r] is out of range)."""
    env = np.asarray(env, dtype=int)
    ok = (env >= 0) & (env < matrix.shape[1])
    out = np.full(len(env), np.nan)
    rows = np.nonzero(ok)[0]
    out[rows] = matrix[rows, env[rows]]
    return out
