"""Tables 1-4 and generic per-dataset tables from selected results; markdown / LaTeX / CSV.

A :class:`Table` carries display rows (strings), notes (what each mark ``[a]``, ``[b]`` ...
means), a summary line (runs used / excluded and why) and a tidy long-form DataFrame (one
row per cell, numbers not strings) that the CSV output and the plots use.

Cells touched by a problem (excluded runs, failed selections, included incomplete runs,
configs chosen without a held-out split) carry a mark whose note says what happened; a
cell that cannot be computed shows ``—`` and its mark says why.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import pandas as pd
from tabulate import DataRow, Line, TableFormat, tabulate

from domainbed_sil import model_selection
from domainbed_sil.paper_results import PAPER_TABLES, PaperTable, PaperValue, paper_table_for
from domainbed_sil.records import DIVERGED, EXCLUSION_REASONS, INCOMPLETE, MALFORMED, Sweep

DASH = "—"
_REASON_TEXT = {INCOMPLETE: "incomplete (no done file)", DIVERGED: "diverged (null/NaN metric)",
                MALFORMED: "malformed lines or fields"}
_CRITERION = {
    "training_domain": "training-domain validation",
    "final_step": "training-domain validation at the final step",
    "oracle": "test-env out-split accuracy",
    "leave_one_out": "leave-one-domain-out validation",
}
# one text for every such cell, so that the table carries it under a single letter
TRAIN_IN_VALIDATION_NOTE = ("runs without a held-out split (holdout_fraction 0, Colored MNIST's default): "
                            "training-domain validation scored them on their training accuracy")
TIDY_COLUMNS = ["table", "selection", "dataset", "row", "column", "test_env", "mean", "std", "n",
                "paper_mean", "paper_std", "diff", "marks", "status"]


@dataclass
class Table:
    """One rendered table: ``headers`` and ``rows`` are display strings."""

    key: str
    title: str
    headers: List[str]
    rows: List[List[str]]
    notes: List[str]
    summary: str
    tidy: pd.DataFrame
    decimals: int = 1
    dataset: str = ""
    method: str = ""


@dataclass
class SelectionResult:
    """A selection method applied to the whole sweep (all datasets at once)."""

    method: str
    cells: pd.DataFrame  # model_selection.aggregate output
    chosen: pd.DataFrame
    candidates: pd.DataFrame
    failures: pd.DataFrame
    # lookups by (dataset, row, test_env), built once in __post_init__
    _cells_at: Dict[Tuple[str, str, int], int] = field(init=False, repr=False)
    _failures_at: Dict[Tuple[str, str, int], List[Tuple[str, int]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._cells_at = {(d, r, int(t)): i for i, (d, r, t) in
                          enumerate(zip(self.cells["dataset"], self.cells["row"], self.cells["test_env"]))}
        self._failures_at = {}
        if len(self.failures):
            counts = self.failures.groupby(["dataset", "row", "test_env", "reason"]).size()
            for (d, r, t, reason), n in counts.items():
                self._failures_at.setdefault((d, r, int(t)), []).append((reason, int(n)))

    def cell(self, dataset: str, row: str, test_env: int) -> Optional[pd.Series]:
        """The aggregated cell (a row of ``cells``), or None when the sweep has none."""
        hit = self._cells_at.get((dataset, row, int(test_env)))
        return None if hit is None else self.cells.iloc[hit]

    def failure_counts(self, dataset: str, row: str, test_env: int) -> List[Tuple[str, int]]:
        """(reason, number of runs) for the failures of one cell, sorted by reason."""
        return self._failures_at.get((dataset, row, int(test_env)), [])


def apply_selection(sweep: Sweep, method: str) -> SelectionResult:
    """Run ``method`` over every used record of ``sweep``."""
    records = sweep.used_records()
    selection = model_selection.SELECTION_METHODS[method](records)
    chosen = model_selection.select_configs(selection.candidates)
    return SelectionResult(method, model_selection.aggregate(chosen), chosen, selection.candidates, selection.failures)


# ---------------------------------------------------------------- number formatting

def fmt_mean_std(mean: float, std: Optional[float], decimals: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def fmt_paper(value: Optional[PaperValue], decimals: int) -> str:
    return DASH if value is None else fmt_mean_std(value.mean, value.std, decimals)


def fmt_diff(ours: Optional[float], paper: Optional[PaperValue], decimals: int) -> str:
    if ours is None or paper is None or math.isnan(ours):
        return ""
    diff = round(ours - paper.mean, decimals) + 0.0  # + 0.0: no "-0.0" for a rounding residue
    return f"{diff:+.{decimals}f}"


# ---------------------------------------------------------------- problems behind a cell

class _Marks:
    """Assigns letters to distinct notes of one table, in order of first use."""

    def __init__(self) -> None:
        self.notes: List[str] = []

    def mark(self, texts: Sequence[str]) -> str:
        letters = []
        for text in texts:
            if text not in self.notes:
                self.notes.append(text)
            letters.append(_letter(self.notes.index(text)))
        return "".join(f"[{letter}]" for letter in letters)

    def legend(self) -> List[str]:
        return [f"[{_letter(i)}] {text}" for i, text in enumerate(self.notes)]


def _letter(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i] if i < 26 else letters[i // 26 - 1] + letters[i % 26]


def _reason_counts(reasons: pd.Series) -> str:
    """"1 incomplete (no done file), 2 diverged (...)" in the fixed order of EXCLUSION_REASONS."""
    counts = reasons.value_counts()
    return ", ".join(f"{counts[r]} {_REASON_TEXT[r]}" for r in EXCLUSION_REASONS if r in counts)


def _cell_runs(sweep: Sweep, dataset: str, row: str, test_env: int, method: str) -> pd.DataFrame:
    """Every run read that belongs to a cell (pair runs only for leave-one-out)."""
    mine = sweep.runs_of(dataset, row)
    single = mine["test_env"] == test_env
    if method == "leave_one_out":
        pair = (mine["n_test_envs"] == 2) & mine["test_envs"].str.split(",").apply(lambda envs: str(test_env) in envs)
        return mine[single | pair]
    return mine[single]


def cell_problems(sweep: Sweep, result: SelectionResult, dataset: str, row: str, test_env: int,
                  label: str) -> List[str]:
    """Human-readable problems behind one cell; ``label`` names the cell in each text."""
    problems = []
    runs = _cell_runs(sweep, dataset, row, test_env, result.method)
    excluded = runs[runs["excluded"] != ""]
    if len(excluded):
        reasons = _reason_counts(excluded["excluded"])
        examples = ", ".join(excluded.index[:2]) + (" ..." if len(excluded) > 2 else "")
        problems.append(f"{label}: {len(excluded)} run(s) excluded: {reasons} ({examples})")
    cell = result.cell(dataset, row, test_env)
    for reason, count in result.failure_counts(dataset, row, test_env):
        problems.append(f"{label}: {count} run(s) not scored: {reason}")
    if cell is not None:
        used = sweep.runs.loc[list(cell["run_ids"])]
        n_incomplete = int((~used["done"]).sum())
        if n_incomplete:
            problems.append(f"{label}: includes {n_incomplete} incomplete run(s) (--include_incomplete)")
        if cell["n_duplicates"]:
            problems.append(f"{label}: {int(cell['n_duplicates'])} extra run(s) of the same config and trial seed "
                            f"(e.g. another --seed) competed like configs instead of being averaged")
        if cell["n_configs"] > 1 and "train_in" in cell["val_sources"]:
            problems.append(f"{label}: configs compared on training-split accuracy (runs have no held-out split)")
    return problems


def cell_info(result: SelectionResult, dataset: str, row: str, test_env: int, label: str) -> List[str]:
    """Notes that are not problems: how many configs competed per trial, what was validated on."""
    cell = result.cell(dataset, row, test_env)
    if cell is None:
        return []
    notes = []
    if cell["n_configs"] > 1:
        notes.append(f"{label}: best of {int(cell['n_configs'])} hyperparameter configs per trial by {_CRITERION[result.method]}")
    if result.method == "training_domain" and "train_in" in cell["val_sources"]:
        notes.append(TRAIN_IN_VALIDATION_NOTE)
    return notes


def _summary(sweep: Sweep, result: SelectionResult, dataset: str, test_envs: Optional[Iterable[int]]) -> str:
    """Runs read / used / excluded (and why) / not used, for one dataset's table."""
    runs = sweep.runs[sweep.runs["dataset"] == dataset] if len(sweep.runs) else sweep.runs
    test_envs = None if test_envs is None else sorted(set(test_envs))
    if test_envs is not None and len(runs):
        in_table = runs["test_env"].isin(test_envs)
        if result.method == "leave_one_out":
            in_table |= runs["n_test_envs"] == 2
    else:
        in_table = pd.Series(True, index=runs.index)
    def of_table(frame: pd.DataFrame) -> pd.DataFrame:
        if not len(frame):
            return frame
        mask = frame["dataset"] == dataset
        return frame[mask & frame["test_env"].isin(test_envs)] if test_envs is not None else frame[mask]

    chosen, considered = of_table(result.chosen), of_table(result.candidates)
    n_chosen = chosen["run_id"].nunique() if len(chosen) else 0
    n_considered = considered["run_id"].nunique() if len(considered) else 0
    excluded = runs[in_table & (runs["excluded"] != "")] if len(runs) else runs
    parts = [f"{len(runs)} run(s) read", f"{n_chosen} in cells"]
    if n_considered > n_chosen:
        parts.append(f"{n_considered - n_chosen} more evaluated as other configs")
    if result.method == "leave_one_out" and len(runs):
        parts.append(f"{int((in_table & (runs['n_test_envs'] == 2) & (runs['excluded'] == '')).sum())} pair run(s) used for validation")
    if len(excluded):
        parts.append("excluded " + _reason_counts(excluded["excluded"]))
    else:
        parts.append("excluded 0")
    if len(runs):
        bad_lines = int(runs.loc[in_table, "n_malformed"].sum())
        if bad_lines:
            parts.append(f"{bad_lines} malformed line(s)/record(s)")
        unused = runs[~in_table]
        if len(unused):
            envs = ", ".join(f"[{e.replace(',', ', ')}]" for e in sorted(set(unused["test_envs"])))
            parts.append(f"{len(unused)} not in this table (test_envs {envs})")
    if sweep.unreadable:
        parts.append(f"{len(sweep.unreadable)} unreadable file(s) in the sweep")
    return "Summary: " + "; ".join(parts) + "."


# ---------------------------------------------------------------- table builders

def _rows_in_order(paper: Optional[PaperTable], sweep_rows: Iterable[str]) -> List[str]:
    """The paper's rows in its order, new rows (sorted) inserted before its first constant / reference row."""
    sweep_rows = sorted(set(sweep_rows))
    if paper is None:
        return sweep_rows
    order = paper.row_order()
    tail = set(paper.constant_rows) | set(paper.reference_rows)
    cut = next((i for i, r in enumerate(order) if r in tail), len(order))
    new = [r for r in sweep_rows if r not in paper.rows]
    return order[:cut] + new + order[cut:]


def _tidy_row(table: str, method: str, dataset: str, row: str, column: str, test_env: Optional[int],
              mean: Optional[float], std: Optional[float], n: int, paper: Optional[PaperValue],
              marks: str, status: str) -> Dict:
    return {
        "table": table, "selection": method, "dataset": dataset, "row": row, "column": column,
        "test_env": test_env, "mean": mean, "std": std, "n": n,
        "paper_mean": None if paper is None else paper.mean,
        "paper_std": None if paper is None else paper.std,
        "diff": None if (paper is None or mean is None) else mean - paper.mean,
        "marks": marks, "status": status,
    }


def build_train_test_table(sweep: Sweep, result: SelectionResult, paper: PaperTable) -> Table:
    """Tables 1-2: Train / Test accuracy beside the paper, with n restarts."""
    d, test_env = paper.decimals, paper.test_env
    dataset = paper.dataset
    sweep_rows = result.cells.loc[(result.cells["dataset"] == dataset) & (result.cells["test_env"] == test_env), "row"]
    run_rows = sweep.runs.loc[(sweep.runs["dataset"] == dataset), "row"] if len(sweep.runs) else []
    marks = _Marks()
    rows, tidy = [], []
    for row in _rows_in_order(paper, list(sweep_rows) + list(run_rows)):
        pv = paper.rows.get(row, {})
        if row in paper.constant_rows:
            rows.append([row, fmt_paper(pv["Train"], d), fmt_paper(pv["Train"], d), "",
                         fmt_paper(pv["Test"], d), fmt_paper(pv["Test"], d), "", DASH])
            for col in ("Train", "Test"):
                tidy.append(_tidy_row(paper.key, result.method, dataset, row, col, test_env, pv[col].mean, None, 0,
                                      pv[col], "", "constant"))
            continue
        cell = result.cell(dataset, row, test_env)
        mark = marks.mark(cell_problems(sweep, result, dataset, row, test_env, row)
                          + cell_info(result, dataset, row, test_env, row))
        suffix = f" {mark}" if mark else ""
        if cell is None:
            status = "no runs" if not mark else "not computed"
            rows.append([row, DASH + suffix, fmt_paper(pv.get("Train"), d), "", DASH + suffix,
                         fmt_paper(pv.get("Test"), d), "", "0"])
            for col in ("Train", "Test"):
                tidy.append(_tidy_row(paper.key, result.method, dataset, row, col, test_env, None, None, 0,
                                      pv.get(col), mark, status))
            continue
        values = {"Train": (cell["train_mean"], cell["train_std"]), "Test": (cell["test_mean"], cell["test_std"])}
        line = [row]
        for col in ("Train", "Test"):
            mean, std = values[col]
            line += [fmt_mean_std(mean, std, d) + suffix, fmt_paper(pv.get(col), d), fmt_diff(mean, pv.get(col), d)]
            tidy.append(_tidy_row(paper.key, result.method, dataset, row, col, test_env, mean, std, int(cell["n"]),
                                  pv.get(col), mark, "ok"))
        rows.append(line + [str(int(cell["n"]))])
    headers = ["Method", "Train", "Train (paper)", "Train Δ", "Test", "Test (paper)", "Test Δ", "n"]
    title = f"{paper.title} — selection: {model_selection.SELECTION_TITLES[result.method]} (test env {test_env}, %)"
    return Table(f"{paper.key}_{result.method}", title, headers, rows, marks.legend(),
                 _summary(sweep, result, dataset, [test_env]), pd.DataFrame(tidy, columns=TIDY_COLUMNS), d,
                 dataset, result.method)


@dataclass(frozen=True)
class _EnvCell:
    """One (row, test environment) cell of a per-environment table (Tables 3-4, generic)."""

    env: int
    label: str  # the column: a paper domain name or env{i}
    mark: str   # note letters, "" when none
    mean: Optional[float]
    std: Optional[float]
    n: int
    status: str  # ok | no runs | not computed

    def text(self, decimals: int) -> str:
        value = DASH if self.mean is None else fmt_mean_std(self.mean, self.std, decimals)
        return f"{value} {self.mark}" if self.mark else value


def _env_cells(sweep: Sweep, result: SelectionResult, marks: _Marks, dataset: str, row: str,
               columns: Sequence[Tuple[int, str]]) -> List[_EnvCell]:
    """The cells of ``row`` for each ``(test env, column label)``, with their notes registered in ``marks``."""
    cells = []
    for env, label in columns:
        cell = result.cell(dataset, row, env)
        mark = marks.mark(cell_problems(sweep, result, dataset, row, env, f"{row} / {label}")
                          + cell_info(result, dataset, row, env, f"{row} / {label}"))
        if cell is None:
            cells.append(_EnvCell(env, label, mark, None, None, 0, "not computed" if mark else "no runs"))
        else:
            cells.append(_EnvCell(env, label, mark, cell["test_mean"], cell["test_std"], int(cell["n"]), "ok"))
    return cells


def _average(cells: Sequence[_EnvCell]) -> Tuple[Optional[float], int, str]:
    """(mean over the environments, smallest n, status); the mean only when every one has a value."""
    have = [c for c in cells if c.mean is not None]
    if not have:
        return None, 0, "no runs"
    if len(have) < len(cells):
        return None, 0, "incomplete row"
    return sum(c.mean for c in have) / len(have), min(c.n for c in have), "ok"


def _average_text(cells: Sequence[_EnvCell], decimals: int) -> str:
    average = _average(cells)[0]
    if average is not None:
        return fmt_mean_std(average, None, decimals)
    have = sum(c.mean is not None for c in cells)
    return DASH if not have else f"{DASH} ({have}/{len(cells)} domains)"


def _n_text(cells: Sequence[_EnvCell]) -> str:
    ns = [c.n for c in cells if c.mean is not None]
    return DASH if not ns else (str(min(ns)) if min(ns) == max(ns) else f"{min(ns)}–{max(ns)}")


def build_domain_table(sweep: Sweep, result: SelectionResult, paper: PaperTable) -> Table:
    """Tables 3-4: a column per test domain (paper's order), the average, each beside the paper."""
    d, dataset = paper.decimals, paper.dataset
    columns = [(paper.env_of_column[c], c) for c in paper.columns if c in paper.env_of_column]
    sweep_rows = result.cells.loc[result.cells["dataset"] == dataset, "row"]
    run_rows = sweep.runs.loc[(sweep.runs["dataset"] == dataset), "row"] if len(sweep.runs) else []
    marks = _Marks()
    rows, tidy = [], []
    for row in _rows_in_order(paper, list(sweep_rows) + list(run_rows)):
        pv = paper.rows.get(row, {})
        line = [row]
        if row in paper.reference_rows:
            for col in paper.columns:
                line += ["reported only", fmt_paper(pv.get(col), d), ""]
                tidy.append(_tidy_row(paper.key, result.method, dataset, row, col, paper.env_of_column.get(col),
                                      None, None, 0, pv.get(col), "", "reference only"))
            rows.append(line + [DASH])
            continue
        cells = _env_cells(sweep, result, marks, dataset, row, columns)
        for c in cells:
            line += [c.text(d), fmt_paper(pv.get(c.label), d), fmt_diff(c.mean, pv.get(c.label), d)]
            tidy.append(_tidy_row(paper.key, result.method, dataset, row, c.label, c.env, c.mean, c.std, c.n,
                                  pv.get(c.label), c.mark, c.status))
        (average, n, status), avg_paper = _average(cells), pv.get("Avg")
        line += [_average_text(cells, d), fmt_paper(avg_paper, d), fmt_diff(average, avg_paper, d)]
        tidy.append(_tidy_row(paper.key, result.method, dataset, row, "Avg", None, average, None, n, avg_paper, "", status))
        rows.append(line + [_n_text(cells)])
    headers = ["Method"]
    for col in paper.columns:
        headers += [col, f"{col} (paper)", f"{col} Δ"]
    headers.append("n")
    title = f"{paper.title} — selection: {model_selection.SELECTION_TITLES[result.method]} (%)"
    return Table(f"{paper.key}_{result.method}", title, headers, rows, marks.legend(),
                 _summary(sweep, result, dataset, paper.env_of_column.values()), pd.DataFrame(tidy, columns=TIDY_COLUMNS), d,
                 dataset, result.method)


def environment_labels(dataset: str, test_envs: Sequence[int]) -> List[str]:
    """Column labels ``env{i}``, with the paper's domain name where it has one (``Caltech (env 0)``).

    Names come from the paper tables, not the dataset registry: importing the datasets would
    import torch and torchvision (seconds) just to print a header.
    """
    paper = paper_table_for(dataset)
    names = {env: name for name, env in paper.env_of_column.items()} if paper else {}
    return [f"{names[t]} (env {t})" if t in names else f"env{t}" for t in test_envs]


def build_generic_table(sweep: Sweep, result: SelectionResult, dataset: str, decimals: int = 1) -> Table:
    """Any dataset: a row per algorithm in the sweep, a column per test env present, and Avg."""
    runs = sweep.runs[sweep.runs["dataset"] == dataset]
    test_envs = sorted(int(t) for t in set(runs.loc[runs["n_test_envs"] == 1, "test_env"]))
    labels = environment_labels(dataset, test_envs)
    marks = _Marks()
    rows, tidy = [], []
    for row in sorted(set(runs["row"])):
        cells = _env_cells(sweep, result, marks, dataset, row, list(zip(test_envs, labels)))
        for c in cells:
            tidy.append(_tidy_row(dataset, result.method, dataset, row, c.label, c.env, c.mean, c.std, c.n, None,
                                  c.mark, c.status))
        average, n, status = _average(cells)
        tidy.append(_tidy_row(dataset, result.method, dataset, row, "Avg", None, average, None, n, None, "", status))
        rows.append([row] + [c.text(decimals) for c in cells] + [_average_text(cells, decimals), _n_text(cells)])
    title = f"{dataset}: test accuracy per test environment — selection: {model_selection.SELECTION_TITLES[result.method]} (%)"
    return Table(f"{dataset}_{result.method}", title, ["Method"] + labels + ["Avg", "n"], rows, marks.legend(),
                 _summary(sweep, result, dataset, test_envs), pd.DataFrame(tidy, columns=TIDY_COLUMNS), decimals,
                 dataset, result.method)


def build_tables(sweep: Sweep, methods: Optional[Sequence[str]] = None) -> Tuple[List[Table], Dict[str, SelectionResult]]:
    """Every table the sweep supports.

    Paper tables (1-4) for the paper's datasets present in the sweep, each under ``methods``
    (default: the paper's own selection for that table: final step for 1-2, training-domain
    validation for 3-4); then a generic DomainBed-style table (test accuracy per test env) for
    every dataset in the sweep, paper datasets included (default selection: the paper table's,
    else training-domain validation).
    Returns the tables and the selection results they were built from (by method name).
    """
    from domainbed_sil.paper_results import DEFAULT_SELECTION

    datasets = sorted(set(sweep.runs["dataset"])) if len(sweep.runs) else []
    results: Dict[str, SelectionResult] = {}

    def result_for(method: str) -> SelectionResult:
        if method not in results:
            results[method] = apply_selection(sweep, method)
        return results[method]

    tables: List[Table] = []
    for paper in PAPER_TABLES:
        if paper.dataset not in datasets:
            continue
        for method in methods or [DEFAULT_SELECTION[paper.key]]:
            build = build_train_test_table if paper.test_env is not None else build_domain_table
            tables.append(build(sweep, result_for(method), paper))
    for dataset in datasets:
        paper = paper_table_for(dataset)
        for method in methods or [DEFAULT_SELECTION[paper.key] if paper else "training_domain"]:
            tables.append(build_generic_table(sweep, result_for(method), dataset))
    return tables, results


# ---------------------------------------------------------------- output formats

def to_markdown(table: Table) -> str:
    body = tabulate(table.rows, headers=table.headers, tablefmt="pipe", disable_numparse=True)
    parts = [f"### {table.title}", "", body, ""]
    parts += [f"- {note}" for note in table.notes]
    if table.notes:
        parts.append("")
    parts.append(table.summary)
    return "\n".join(parts) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "—": "---", "–": "--", "×": r"$\times$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII symbols used here to macros.

    Other non-ASCII characters are kept (``\\usepackage[utf8]{inputenc}`` handles Latin ones).
    """
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def _booktabs_begin(colwidths: Sequence[int], colaligns: Sequence[str]) -> str:
    spec = "".join("l" if i == 0 else "r" for i in range(len(colwidths)))
    return f"\\begin{{tabular}}{{{spec}}}\n\\toprule"


# tabulate's own latex_booktabs escapes only ASCII specials; the cells here are pre-escaped
# (± and Δ included), so the rows go through unchanged.
_BOOKTABS = TableFormat(
    lineabove=_booktabs_begin,
    linebelowheader=Line("\\midrule", "", "", ""),
    linebetweenrows=None,
    linebelow=Line("\\bottomrule\n\\end{tabular}", "", "", ""),
    headerrow=DataRow("", "&", "\\\\"),
    datarow=DataRow("", "&", "\\\\"),
    padding=1,
    with_header_hide=None,
)


def to_latex(table: Table) -> str:
    """A ``table`` float (needs ``\\usepackage{booktabs}``), notes and summary below the tabular."""
    rows = [[latex_escape(c) for c in row] for row in table.rows]
    headers = [latex_escape(h) for h in table.headers]
    body = tabulate(rows, headers=headers, tablefmt=_BOOKTABS, disable_numparse=True)
    notes = " \\\\\n".join(latex_escape(n) for n in table.notes + [table.summary])
    return (
        "\\begin{table}[htbp]\n\\centering\n\\scriptsize\n"
        f"\\caption{{{latex_escape(table.title)}}}\n"
        f"\\label{{tab:{latex_escape(table.key).replace(chr(92) + '_', '-')}}}\n"
        "\\resizebox{\\linewidth}{!}{%\n"
        f"{body}%\n}}\n"
        f"\\par\\smallskip\\raggedright\\footnotesize {notes}\n"
        "\\end{table}\n"
    )


def latex_document(tables: Sequence[Table]) -> str:
    """A standalone document with every table (compiles with pdflatex)."""
    head = ("\\documentclass{article}\n\\usepackage[utf8]{inputenc}\n\\usepackage[T1]{fontenc}\n"
            "\\usepackage{booktabs}\n\\usepackage{graphicx}\n\\usepackage[margin=1.5cm,landscape]{geometry}\n"
            "\\begin{document}\n")
    return head + "\n".join(to_latex(t) for t in tables) + "\\end{document}\n"


def _with_note_texts(table: Table) -> pd.DataFrame:
    """The table's tidy frame plus ``notes``: the texts behind each cell's marks, " | "-joined."""
    texts = {}
    for note in table.notes:
        letter, text = note[1:].split("] ", 1)
        texts[letter] = text
    notes = [" | ".join(texts[m] for m in marks[1:-1].split("][")) if marks else "" for marks in table.tidy["marks"]]
    return table.tidy.assign(notes=notes)


def to_csv(tables: Sequence[Table]) -> str:
    """Tidy CSV: one line per cell of every table (numbers in percent, not display strings)."""
    frames = [_with_note_texts(t) for t in tables]
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=TIDY_COLUMNS + ["notes"])
    for column in ("mean", "std", "paper_mean", "paper_std", "diff"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["test_env"] = pd.to_numeric(frame["test_env"], errors="coerce").astype("Int64")
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.4f")
    return buffer.getvalue()
