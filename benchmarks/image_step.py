"""Seconds per PACS training step (AlexNet, the JiGen protocol), data loading included.

    python benchmarks/image_step.py                         # PACS_mini, 225 px, batch 32 per domain
    python benchmarks/image_step.py --data_subdir PACS --steps 10 --device cuda
    python benchmarks/image_step.py --algorithms ERM SIL --image_size 225 --batch_size 128

For each algorithm: the mean seconds of ``update(next(minibatches))`` over ``--steps`` steps after
one warm-up step (3 training domains, so 3 x batch_size images per step), and separately the
seconds spent waiting for the batch.  Random AlexNet weights (step time does not depend on them).
Multiply by the run's steps (printed: 30 epochs of full PACS at this batch size) for the time per run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.datasets import DATASETS
from domainbed_sil.datasets.base import resolve_data_dir
from domainbed_sil.datasets.images import steps_per_epoch
from domainbed_sil.hparams import default_hparams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None)
    p.add_argument("--data_subdir", default="PACS_mini")
    p.add_argument("--algorithms", nargs="+", default=["ERM", "SIL"])
    p.add_argument("--image_size", type=int, default=225)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--network", default="alexnet")
    args = p.parse_args()
    device = torch.device(args.device)
    pacs = DATASETS.get("PACS")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {device}; {args.network} {args.image_size}px, "
          f"batch {args.batch_size} per domain x 3 domains")
    full_steps = 30 * steps_per_epoch([n for d, n in pacs.EXPECTED_COUNTS.items() if d != "art_painting"],
                                      args.batch_size, pacs.HOLDOUT_FRACTION)
    for name in args.algorithms:
        algorithm_class = ALGORITHMS.get(name)
        hparams = default_hparams(algorithm_class, pacs)
        hparams.update(pretrained=False, image_size=args.image_size, batch_size=args.batch_size,
                       data_subdir=args.data_subdir, network=args.network, lr_decay_at_step=0)
        dataset = pacs(resolve_data_dir(args.data_dir), hparams, trial_seed=0, test_envs=[0])
        torch.manual_seed(0)
        algorithm = algorithm_class(dataset.input_shape, dataset.num_classes, 3, hparams).to(device)
        batches = dataset.minibatches(dataset.environments[1:], args.batch_size, device, torch.Generator().manual_seed(0))
        algorithm.update(next(batches))  # warm-up: workers start, allocator settles
        waits, steps = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            algorithm.update(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            waits.append(t1 - t0)
            steps.append(time.perf_counter() - t1)
        per_step = statistics.mean(steps) + statistics.mean(waits)
        print(f"{name:5s} {per_step:7.3f} s/step (update {statistics.mean(steps):.3f}, batch wait "
              f"{statistics.mean(waits):.3f}); full PACS test env 0: {full_steps} steps = "
              f"{per_step * full_steps / 3600:.2f} h + evaluation")


if __name__ == "__main__":
    main()
