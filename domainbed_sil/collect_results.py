"""Tables from a sweep: ``python -m domainbed_sil.collect_results --input_dir DIR``.

Reads every results.jsonl below DIR (this harness's runs or DomainBed's), applies model
selection and prints the paper's Tables 1-4 beside the paper's numbers, plus a generic table
per other dataset.  See docs/collect_results.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from domainbed_sil.model_selection import SELECTION_METHODS
from domainbed_sil.records import load_sweep
from domainbed_sil.tables import build_tables, latex_document, to_csv, to_latex, to_markdown

FORMATS = ("markdown", "latex", "csv")
FILE_NAMES = {"markdown": "tables.md", "latex": "tables.tex", "csv": "tables.csv"}


class UsageError(ValueError):
    """Bad input: reported as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m domainbed_sil.collect_results", description=__doc__.splitlines()[0])
    p.add_argument("--input_dir", required=True, help="sweep directory; every results.jsonl below it is read")
    p.add_argument("--format", nargs="+", default=["markdown"], choices=FORMATS,
                   help="one or more output formats (default: markdown)")
    p.add_argument("--selection", nargs="+", default=None, choices=list(SELECTION_METHODS) + ["all"],
                   help="selection method(s); default: the paper's per table "
                        "(final_step for Tables 1-2, training_domain for Tables 3-4 and generic tables)")
    p.add_argument("--output", default=None,
                   help="directory to write tables.md / tables.tex (standalone document) / tables.csv into")
    p.add_argument("--quiet", action="store_true", help="with --output: do not also print the tables")
    p.add_argument("--plots", action="store_true", help="write PNG figures into <output>/plots (needs --output)")
    p.add_argument("--include_incomplete", action="store_true",
                   help="use runs without a done file too (their cells are marked)")
    return p


def _methods(selection: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not selection:
        return None
    if "all" in selection:
        return list(SELECTION_METHODS)
    return list(dict.fromkeys(selection))


def render(tables, fmt: str) -> str:
    if fmt == "markdown":
        return "\n".join(to_markdown(t) for t in tables)
    if fmt == "latex":
        return "\n".join(to_latex(t) for t in tables)
    return to_csv(tables)


def run(args: argparse.Namespace) -> int:
    if args.plots and not args.output:
        raise UsageError("--plots writes PNG files and needs --output DIR")
    if args.quiet and not args.output:
        raise UsageError("--quiet only makes sense with --output DIR (otherwise nothing would be written)")
    input_dir = Path(args.input_dir)
    if not input_dir.is_dir():
        raise UsageError(f"--input_dir {input_dir} does not exist or is not a directory; expected a sweep directory")
    start = time.perf_counter()
    sweep = load_sweep(input_dir, include_incomplete=args.include_incomplete)
    if not len(sweep.runs):
        detail = f" ({len(sweep.unreadable)} results.jsonl file(s) with no valid record)" if sweep.unreadable else ""
        raise UsageError(f"no records found under {input_dir}{detail}; expected results.jsonl files written by "
                         "domainbed_sil.train or DomainBed")
    tables, results = build_tables(sweep, _methods(args.selection))
    outputs = {fmt: render(tables, fmt) for fmt in args.format}
    if not args.quiet:
        for fmt in args.format:
            sys.stdout.write(outputs[fmt])
            sys.stdout.write("\n")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for fmt in args.format:
            text = latex_document(tables) if fmt == "latex" else outputs[fmt]
            (out / FILE_NAMES[fmt]).write_text(text)
            print(f"wrote {out / FILE_NAMES[fmt]}", file=sys.stderr)
        if args.plots:
            _write_plots(sweep, tables, results, out / "plots")
    counts = sweep.exclusion_counts()
    excluded = ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "none"
    print(f"{len(sweep.runs)} run(s), {len(sweep.records)} record(s) read; excluded: {excluded}; "
          f"{len(tables)} table(s) in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def _write_plots(sweep, tables, results, plot_dir: Path) -> None:
    from domainbed_sil import plots  # matplotlib only when asked for

    plot_dir.mkdir(parents=True, exist_ok=True)
    records = sweep.used_records()
    written = []
    for table in tables:
        written.append(plots.plot_table_bars(table, plot_dir))
    for method, result in results.items():
        for dataset in sorted(set(result.chosen["dataset"])) if len(result.chosen) else []:
            written += plots.plot_curves(records, result, dataset, plot_dir)
    print(f"wrote {len(written)} figure(s) into {plot_dir}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
