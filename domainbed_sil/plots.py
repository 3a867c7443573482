"""PNG figures (matplotlib, Agg backend): training curves per dataset, and bars against the paper.

- :func:`plot_curves`: for one dataset and one selection, accuracy of the training envs,
  accuracy of the test env and the penalty against step, one line per table row (the
  runs that the table's cells used), mean over restarts with a band of +- one population std.
- :func:`plot_table_bars`: one figure per table, ours vs the paper per column, error bars = std.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import matplotlib

matplotlib.use("Agg")  # files only; no display is assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from domainbed_sil.model_selection import with_accuracies  # noqa: E402
from domainbed_sil.tables import SelectionResult, Table  # noqa: E402


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def curve_frame(records: pd.DataFrame, run_ids) -> pd.DataFrame:
    """Per (row, step): mean and population std over runs of train acc, test acc (percent) and penalty."""
    frame = with_accuracies(records[records["run_id"].isin(set(run_ids))])
    if not len(frame):
        return pd.DataFrame()
    if "penalty" not in frame.columns:
        frame = frame.assign(penalty=np.nan)
    frame = frame.assign(train=frame["train_acc"] * 100.0, test=frame["heldout_test_acc"] * 100.0)
    grouped = frame.groupby(["row", "step"])[["train", "test", "penalty"]]
    return grouped.mean().join(grouped.std(ddof=0).add_suffix("_std")).reset_index()


def plot_curves(records: pd.DataFrame, result: SelectionResult, dataset: str, out_dir: Path) -> List[Path]:
    """One figure per (dataset, test env) with three panels; returns the files written."""
    written = []
    chosen = result.chosen[result.chosen["dataset"] == dataset]
    for test_env, group in chosen.groupby("test_env"):
        curves = curve_frame(records, group["run_id"])
        if not len(curves):
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for row, rc in curves.groupby("row"):
            for ax, metric in zip(axes, ("train", "test", "penalty")):
                mean, std = rc[metric].to_numpy(float), rc[f"{metric}_std"].to_numpy(float)
                line, = ax.plot(rc["step"], mean, label=row)
                ax.fill_between(rc["step"], mean - std, mean + std, alpha=0.2, color=line.get_color())
        for ax, label in zip(axes, ("train envs accuracy (%)", f"test env {test_env} accuracy (%)", "penalty")):
            ax.set_xlabel("step")
            ax.set_ylabel(label)
        axes[2].set_yscale("symlog", linthresh=1e-6)
        axes[0].legend(fontsize="small")
        fig.suptitle(f"{dataset}, test env {test_env}: runs selected by {result.method} (mean ± std over restarts)")
        fig.tight_layout()
        path = out_dir / _safe(f"curves_{dataset}_env{test_env}_{result.method}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_table_bars(table: Table, out_dir: Path) -> Path:
    """Grouped bars per column of ``table``: ours (with std) and the paper's value."""
    tidy = table.tidy
    columns = list(dict.fromkeys(tidy["column"]))
    rows = list(dict.fromkeys(tidy["row"]))
    fig, axes = plt.subplots(1, len(columns), figsize=(max(4.0, 3.2 * len(columns)), 4), squeeze=False)
    x = np.arange(len(rows))
    for ax, column in zip(axes[0], columns):
        part = tidy[tidy["column"] == column].set_index("row").reindex(rows)
        measured = (part["status"] == "ok").to_numpy()  # constant / reference rows: the paper's bar only
        ours = np.where(measured, pd.to_numeric(part["mean"], errors="coerce").to_numpy(float), np.nan)
        ours_err = pd.to_numeric(part["std"], errors="coerce").fillna(0).to_numpy(float)
        paper = pd.to_numeric(part["paper_mean"], errors="coerce").to_numpy(float)
        paper_err = pd.to_numeric(part["paper_std"], errors="coerce").fillna(0).to_numpy(float)
        ax.bar(x - 0.2, ours, 0.4, yerr=ours_err, label="this sweep", capsize=2)
        ax.bar(x + 0.2, paper, 0.4, yerr=paper_err, label="paper", capsize=2, alpha=0.7)
        ax.set_xticks(x)
        ax.set_xticklabels(rows, rotation=45, ha="right", fontsize="small")
        ax.set_title(str(column))
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(table.title, fontsize="small")
    fig.tight_layout()
    path = out_dir / _safe(f"bars_{table.key}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
