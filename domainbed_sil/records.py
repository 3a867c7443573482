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
    checked_fields: Tuple[str, ...] = ()  # accuracy / divergence fields of the first record

    def problem(self, detail: str, count: int = 1) -> None:
        self.problems[detail] = self.problems.get(detail, 0) + count


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


_DECODER = json.JSONDecoder()


class _RepeatedMember:
    """The exact text of a ``"key": value`` member that every line of a file repeats.

    Records repeat ``args`` and ``hparams`` verbatim on every line; replacing that text by a
    placeholder before decoding (one ``str.replace`` over the file) decodes them once per file
    instead of once per line.  A line whose member text differs is decoded in full.
    """

    def __init__(self, line: str, key: str, value: Any):
        self.text: Optional[str] = None
        self.value = value
        self.placeholder = f'"{key}": "{_SHARED}"'
        if not isinstance(value, dict):
            return
        # a raw '"key":' cannot sit inside a string, but a nested object may have the same key
        for match in re.finditer(r'"%s"\s*:\s*' % re.escape(key), line):
            try:
                decoded, end = _DECODER.raw_decode(line, match.end())
            except ValueError:
                continue
            if decoded == value:
                self.text = line[match.start():end]
                return

    def replace_all(self, text: str) -> str:
        return text if self.text is None else text.replace(self.text, self.placeholder)


_SHARED = "__domainbed_sil_shared_member__"
_BAD_LINE = object()


def _first_record(lines: Sequence[str]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
    """The first line that is a record with valid args, and its decoded object."""
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and _args_problem(rec.get("args")) is None and isinstance(rec.get("step"), int):
            return line, rec
    return None, None


def _decode_lines(text: str, lines: Sequence[str]) -> List[Any]:
    """One decoded value (or _BAD_LINE) per line of ``lines`` (``text`` = the same lines joined).

    Fast path: the whole file as one JSON array, accepted only if it yields exactly one
    object per line; otherwise line by line.
    """
    try:
        values = json.loads("[" + text + "]")
        if len(values) == len(lines) and all(isinstance(v, dict) for v in values):
            return values
    except json.JSONDecodeError:
        pass
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append(_BAD_LINE)
    return out


def parse_results_file(path: Path) -> _RunParse:
    """Parse one results.jsonl; never raises on bad content (problems are counted instead).

    Divergence (null / NaN values) is detected afterwards, vectorized, by :func:`load_sweep`.
    """
    parsed = _RunParse()
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        parsed.problem(f"unreadable file ({err.strerror})")
        return parsed
    lines = [line for line in text.splitlines() if line.strip()]
    first_line, first = _first_record(lines)
    if first is not None:
        members = [_RepeatedMember(first_line, "args", first["args"]),
                   _RepeatedMember(first_line, "hparams", first.get("hparams"))]
        shared = {"args": members[0].value, "hparams": members[1].value}
        joined = "\n".join(lines)
        for member in members:
            joined = member.replace_all(joined)
        lines = joined.split("\n")
    first_acc: frozenset = frozenset()
    first_len = -1
    odd_acc_sets: List[frozenset] = []  # accuracy key sets of records that differ from the first
    for rec in _decode_lines(",".join(lines), lines):
        if rec is _BAD_LINE:
            parsed.problem("non-JSON or truncated line")
            continue
        if not isinstance(rec, dict):
            parsed.problem("line is not a JSON object")
            continue
        args = rec.pop("args", None)
        hparams = rec.pop("hparams", None)
        if args == _SHARED:
            args = shared["args"]
        if hparams == _SHARED:
            hparams = shared["hparams"]
        if parsed.args is None or args is not parsed.args:
            problem = _args_problem(args)
            if problem is None and parsed.args is not None and args != parsed.args:
                problem = "records with different args in one file"
            if problem is not None:
                parsed.problem(problem)
                continue
        if not isinstance(rec.get("step"), int):
            parsed.problem("record missing step")
            continue
        if parsed.args is None:
            parsed.args, parsed.hparams = args, hparams
            first_acc = frozenset(k for k in rec if ACC_FIELD.match(k))
            first_len = len(rec)
            parsed.checked_fields = tuple(sorted(first_acc)) + tuple(k for k in _DIVERGENCE_FIELDS if k in rec)
        elif len(rec) != first_len or not rec.keys() >= first_acc:
            odd = frozenset(k for k in rec if ACC_FIELD.match(k))
            if odd != first_acc:
                odd_acc_sets.append(odd)
        parsed.records.append(rec)
    if odd_acc_sets:
        union = first_acc.union(*odd_acc_sets)
        for keys in odd_acc_sets:
            if keys != union:
                parsed.problem("record missing " + ", ".join(sorted(union - keys)))
        if union != first_acc:
            parsed.problem("record missing " + ", ".join(sorted(union - first_acc)),
                           len(parsed.records) - len(odd_acc_sets))
    return parsed


@dataclass
class Sweep:
    """Everything read from a sweep directory (see module docstring)."""

    input_dir: Path
    runs: pd.DataFrame
    records: pd.DataFrame
    unreadable: List[Tuple[str, str]]
    include_incomplete: bool = False
    _runs_by_row: Optional[Dict[Tuple[str, str], pd.DataFrame]] = field(default=None, repr=False)

    def used_records(self) -> pd.DataFrame:
        """Records of used runs joined with their run's identity columns (what selection reads)."""
        used = self.runs[self.runs["used"]]
        meta = used[RUN_META_COLUMNS]
        recs = self.records[self.records["run_id"].isin(used.index)]
        return recs.join(meta, on="run_id")

    def runs_of(self, dataset: str, row: str) -> pd.DataFrame:
        """The runs of one table row (any status); grouped once, then looked up."""
        if self._runs_by_row is None:
            self._runs_by_row = {key: frame for key, frame in self.runs.groupby(["dataset", "row"], sort=False)} \
                if len(self.runs) else {}
        return self._runs_by_row.get((dataset, row), self.runs.iloc[:0])

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
    checked: Dict[str, Tuple[str, ...]] = {}
    for path in sorted(input_dir.rglob(RESULTS)):
        run_id = str(path.parent.relative_to(input_dir)) or "."
        parsed = parse_results_file(path)
        if parsed.args is None:
            reasons = "; ".join(parsed.problems) or "empty file"
            unreadable.append((run_id, reasons))
            continue
        run_rows.append(_run_row(run_id, parsed, (path.parent / DONE).exists()))
        checked[run_id] = parsed.checked_fields
        for rec in parsed.records:
            rec["run_id"] = run_id
        record_blocks.extend(parsed.records)

    records = pd.DataFrame.from_records(record_blocks) if record_blocks else pd.DataFrame(columns=["run_id", "step"])
    for column in records.columns:
        if ACC_FIELD.match(column) or column in _DIVERGENCE_FIELDS:
            records[column] = pd.to_numeric(records[column], errors="coerce")
    runs = pd.DataFrame(run_rows, columns=None if run_rows else ["run_id"] + RUN_META_COLUMNS)
    if run_rows:
        runs = runs.set_index("run_id", drop=False)
        runs.index.name = None
        runs["n_diverged_records"] = diverged_record_counts(records, checked)
        runs["excluded"] = _exclusion_reason(runs, include_incomplete)
        runs["used"] = runs["excluded"] == ""
    else:
        runs = runs.assign(excluded=pd.Series(dtype=str), used=pd.Series(dtype=bool))
    return Sweep(input_dir, runs, records, unreadable, include_incomplete)


def diverged_record_counts(records: pd.DataFrame, checked: Dict[str, Tuple[str, ...]]) -> pd.Series:
    """Per run id: records with a null / NaN value in a field the run's first record has.

    ``checked``: run id -> its accuracy and loss/nll/penalty fields.  Only a run's own fields
    count, so a DomainBed run (no ``nll``) is not diverged for lacking our fields.
    """
    counts = pd.Series(0, index=list(checked), dtype=int)
    by_fields: Dict[Tuple[str, ...], List[str]] = {}
    for run_id, fields in checked.items():
        by_fields.setdefault(fields, []).append(run_id)
    for fields, run_ids in by_fields.items():
        columns = [f for f in fields if f in records.columns]
        if not columns:
            continue
        mask = records["run_id"].isin(run_ids).to_numpy()
        bad = records.loc[mask, columns].isna().any(axis=1)
        per_run = bad.groupby(records.loc[mask, "run_id"]).sum()
        counts.loc[per_run.index] += per_run.astype(int)
    return counts


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
