"""Speed of the collector on a synthetic DomainBed-format sweep of ~100,000 records.

    python benchmarks/collect_results_speed.py [--records 100000] [--dir DIR] [--keep]

Writes the sweep (DomainBed's field conventions: ``args.hparams`` as a JSON string,
``args.steps`` null, ``env{i}_in_acc`` / ``env{i}_out_acc`` only, a ``done`` file per run),
4 algorithms x 4 environments x (4 single + 6 pair test-env sets, so leave-one-out has its
pairs) x hparams seeds x 3 trials, then times loading, each selection method and rendering
every format, and prints the seconds.  Writing the sweep is not part of the timing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from domainbed_sil.records import load_sweep
from domainbed_sil.tables import build_tables, to_csv, to_latex, to_markdown

ALGORITHMS = ("ERM", "IRM", "VREx", "SIL")
N_ENVS = 4
TRIALS = 3
CHECKPOINTS = 42  # records per run


def write_sweep(root: Path, n_records: int, seed: int = 0) -> int:
    """Write about ``n_records`` records; returns the number written."""
    rng = np.random.RandomState(seed)
    test_env_sets = [(t,) for t in range(N_ENVS)] + list(itertools.combinations(range(N_ENVS), 2))
    runs_per_seed = len(ALGORITHMS) * len(test_env_sets) * TRIALS
    hparams_seeds = max(1, round(n_records / (runs_per_seed * CHECKPOINTS)))
    written = 0
    for algorithm, test_envs, hseed, trial in itertools.product(ALGORITHMS, test_env_sets, range(hparams_seeds), range(TRIALS)):
        hparams = {"lr": float(10 ** rng.uniform(-5, -3.5)), "batch_size": int(2 ** rng.uniform(3, 9)),
                   "weight_decay": 0.0, "resnet18": False, "resnet_dropout": 0.0, "class_balanced": False,
                   "nonlinear_classifier": False, "data_augmentation": True}
        args = {"algorithm": algorithm, "checkpoint_freq": None, "data_dir": "/data", "dataset": "PACS",
                "holdout_fraction": 0.2, "hparams": None, "hparams_seed": hseed, "output_dir": "",
                "save_model_every_checkpoint": False, "seed": int(rng.randint(2**31)), "skip_model_save": False,
                "steps": None, "task": "domain_generalization", "test_envs": list(test_envs),
                "trial_seed": trial, "uda_holdout_fraction": 0}
        run_dir = root / f"{algorithm}_{'-'.join(map(str, test_envs))}_{hseed}_{trial}"
        run_dir.mkdir(parents=True)
        args["output_dir"] = str(run_dir)
        accs = np.clip(0.5 + np.cumsum(rng.normal(0.01, 0.02, size=(CHECKPOINTS, 2 * N_ENVS)), axis=0), 0, 1)
        lines = []
        for k in range(CHECKPOINTS):
            rec = {"args": args, "hparams": hparams, "step": 100 * k, "epoch": 100 * k / 50.0,
                   "loss": float(rng.uniform(0.1, 2.0)), "mem_gb": 3.2, "step_time": 0.05}
            for i in range(N_ENVS):
                rec[f"env{i}_in_acc"] = float(accs[k, 2 * i])
                rec[f"env{i}_out_acc"] = float(accs[k, 2 * i + 1])
            lines.append(json.dumps(rec, sort_keys=True))
        (run_dir / "results.jsonl").write_text("\n".join(lines) + "\n")
        (run_dir / "done").write_text("done\n")
        written += CHECKPOINTS
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--dir", default=None, help="where to write the sweep (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the sweep directory")
    args = p.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="collect_bench_"))
    try:
        start = time.perf_counter()
        n = write_sweep(root, args.records)
        print(f"wrote {n} records in {time.perf_counter() - start:.1f} s to {root} (not timed)")

        timings = {}

        def timed(name, fn):
            wall, cpu = time.perf_counter(), time.process_time()
            value = fn()
            timings[name] = (time.perf_counter() - wall, time.process_time() - cpu)
            return value

        sweep = timed("load", lambda: load_sweep(root))
        for method in ("training_domain", "leave_one_out", "oracle", "final_step"):
            timed(f"select+table {method}", lambda: build_tables(sweep, [method]))
        methods = ["training_domain", "leave_one_out", "oracle", "final_step"]
        tables, _ = timed("all 4 methods, tables", lambda: build_tables(sweep, methods))
        text = timed("markdown + latex + csv", lambda: "".join(to_markdown(x) + to_latex(x) for x in tables) + to_csv(tables))
        print(f"{'phase':40s} {'wall s':>8s} {'cpu s':>8s}")
        for name, (wall, cpu) in timings.items():
            print(f"{name:40s} {wall:8.2f} {cpu:8.2f}")
        keys = ("load", "all 4 methods, tables", "markdown + latex + csv")
        wall, cpu = (sum(timings[k][i] for k in keys) for i in (0, 1))
        print(f"{'TOTAL load + 4 methods + 3 formats':40s} {wall:8.2f} {cpu:8.2f}  "
              f"[{len(sweep.runs)} runs, {len(sweep.records)} records, {len(tables)} tables, {len(text)} chars; "
              f"cpu = this process's CPU time, wall includes waiting for a busy machine]")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
