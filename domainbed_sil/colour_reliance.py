"""How much a trained Colored MNIST model relies on colour, measured on its *training* environments.

    python -m domainbed_sil.colour_reliance RUN_DIR [RUN_DIR ...] [--data_dir DIR]

For each environment of the run it prints the model's accuracy as the data is and with the two
colour channels swapped (same digits, same labels, every colour flipped). A colour-blind model
scores the same on both; the drop on the training environments is a diagnostic that needs no
look at the test environment, so it can be used to judge a run without tuning on test.
Reads ``run.json`` and ``model.pt`` of a finished run (train.py without ``--skip_model_save``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from domainbed_sil import run_files
from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.datasets import DATASETS
from domainbed_sil.datasets.base import resolve_data_dir
from domainbed_sil.penalties import correct_predictions


def swap_colour_channels(x: torch.Tensor) -> torch.Tensor:
    """``(N, 2, H, W)`` images with the red and green channels exchanged (a copy)."""
    if x.dim() != 4 or x.shape[1] != 2:
        raise ValueError(f"expected Colored MNIST images of shape (N, 2, H, W), got {tuple(x.shape)}")
    return x.flip(1)


def colour_swap_accuracies(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                           chunk: int = 10_000) -> Tuple[float, float]:
    """(accuracy, accuracy with colours swapped) in [0, 1] of ``predict`` (logits) on ``x (N, 2, H, W)``, ``y (N,)``."""
    right = swapped = 0.0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            xs, ys = x[start:start + chunk], y[start:start + chunk]
            right += float(correct_predictions(predict(xs), ys).sum())
            swapped += float(correct_predictions(predict(swap_colour_channels(xs)), ys).sum())
    return right / len(x), swapped / len(x)


def report(run_dir: Path, data_dir: Path) -> List[str]:
    """One line per environment of the run in ``run_dir``; ValueError naming what is missing."""
    run_json, model_file = run_dir / run_files.IDENTITY, run_dir / run_files.MODEL
    for path in (run_json, model_file):
        if not path.is_file():
            raise ValueError(f"{run_dir}: no {path.name} (expected a finished run of train.py without --skip_model_save)")
    args = json.loads(run_json.read_text())
    hparams = args["resolved_hparams"]
    dataset = DATASETS.get(args["dataset"])(data_dir, hparams, args["trial_seed"], args["test_envs"])
    if tuple(dataset.input_shape[:1]) != (2,):
        raise ValueError(f"{run_dir}: colour swapping needs 2-channel Colored MNIST inputs, "
                         f"dataset {args['dataset']} has shape {dataset.input_shape}")
    n_train = len(dataset.environments) - len(args["test_envs"])
    algorithm = ALGORITHMS.get(args["algorithm"])(dataset.input_shape, dataset.num_classes, n_train, hparams)
    algorithm.load_state_dict(torch.load(model_file, map_location="cpu"))
    algorithm.eval()
    lines = [f"{run_dir}: {args['algorithm']} {args['dataset']} trial {args['trial_seed']}, after {args['steps']} steps"]
    for i, env in enumerate(dataset.environments):
        accuracy, swapped = colour_swap_accuracies(algorithm.predict, env.x, env.y)
        role = "test " if i in args["test_envs"] else "train"
        lines.append(f"  env{i} ({role}): accuracy {100 * accuracy:5.1f}%, colours swapped {100 * swapped:5.1f}%, "
                     f"change {100 * (swapped - accuracy):+5.1f}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m domainbed_sil.colour_reliance", description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--data_dir", default=None, help="default: $DOMAINBED_SIL_DATA, else ./data")
    args = p.parse_args(argv)
    data_dir = resolve_data_dir(args.data_dir)
    for run_dir in args.run_dirs:
        try:
            print("\n".join(report(run_dir, data_dir)))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
