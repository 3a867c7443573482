"""One training run: ``python -m domainbed_sil.train`` or ``main(argv)``.

Writes ``<output_dir>/results.jsonl`` (one record per checkpoint, DomainBed's field names),
``checkpoint.pt`` (everything needed to resume, written atomically every checkpoint) and
``done`` last.  Re-running the same command continues from the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from domainbed_sil import run_files
from domainbed_sil.allocator import MALLOC_VARIABLE, check_malloc_setting, retain_freed_memory
from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.algorithms.base import Algorithm
from domainbed_sil.datasets import DATASETS
from domainbed_sil.datasets.base import DomainDataset, resolve_data_dir, split_environment
from domainbed_sil.hparams import apply_overrides, parse_overrides, random_hparams, seed_hash
from domainbed_sil.penalties import correct_predictions


class UsageError(ValueError):
    """Bad input detected before anything is written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m domainbed_sil.train", description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", default=None, help="default: $DOMAINBED_SIL_DATA, else ./data")
    p.add_argument("--dataset", default="ColoredMNIST")
    p.add_argument("--algorithm", default="ERM")
    p.add_argument("--hparams", default=None, help="JSON object overriding hyperparameters")
    p.add_argument("--hparams_seed", type=int, default=0, help="0 = defaults, else a random draw")
    p.add_argument("--trial_seed", type=int, default=0, help="fixes the data: environments and splits")
    p.add_argument("--seed", type=int, default=0, help="fixes model initialisation and batches")
    p.add_argument("--steps", type=int, default=None, help="default: the dataset's")
    p.add_argument("--checkpoint_freq", type=int, default=None, help="default: the dataset's")
    p.add_argument("--test_envs", type=int, nargs="+", default=None, help="default: the dataset's")
    p.add_argument("--output_dir", default="train_output")
    p.add_argument("--holdout_fraction", type=float, default=None, help="default: the dataset's")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip_model_save", action="store_true", help="do not keep model.pt when done")
    return p


@dataclass
class RunSetup:
    """Everything validated and loaded before the run directory is touched."""

    args: Dict[str, Any]
    hparams: Dict[str, Any]
    dataset: DomainDataset
    algorithm: Algorithm  # initialised from args["seed"], on the CPU
    device: torch.device
    output_dir: Path
    skip_model_save: bool = False


def _parse_device(name: Optional[str]) -> torch.device:
    """The requested device, checked to exist here; default cuda when available, else cpu."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a torch device (expected cpu, cuda or cuda:N): {err}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s); expected cpu or cuda:0..{count - 1}")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: expected cpu, cuda or cuda:N")
    return device


def prepare(args: argparse.Namespace) -> RunSetup:
    """Validate the arguments and load the data; raise UsageError with one clear line."""
    try:
        overrides = parse_overrides(args.hparams)
        dataset_class = DATASETS.get(args.dataset)
        algorithm_class = ALGORITHMS.get(args.algorithm)
        test_envs = list(args.test_envs if args.test_envs is not None else dataset_class.DEFAULT_TEST_ENVS)
        dataset_class.check_test_envs(test_envs)
        hparams = apply_overrides(
            random_hparams(algorithm_class, dataset_class, args.hparams_seed, args.trial_seed), overrides
        )
    except ValueError as err:
        raise UsageError(str(err)) from err
    holdout = args.holdout_fraction if args.holdout_fraction is not None else dataset_class.HOLDOUT_FRACTION
    if not 0.0 <= holdout < 1.0:
        raise UsageError(f"--holdout_fraction must be in [0, 1), got {holdout}")
    data_dir = resolve_data_dir(args.data_dir)
    if not data_dir.is_dir():
        raise UsageError(f"data directory {data_dir} does not exist; pass --data_dir or set DOMAINBED_SIL_DATA")
    try:
        dataset = dataset_class(data_dir, hparams, args.trial_seed, test_envs, holdout_fraction=holdout)
        hparams = dataset.resolve_hparams(hparams)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from err
    steps = args.steps if args.steps is not None else dataset.default_steps()
    freq = args.checkpoint_freq if args.checkpoint_freq is not None else dataset.default_checkpoint_freq()
    if steps < 1 or freq < 1:
        raise UsageError(f"--steps and --checkpoint_freq must be positive integers, got {steps} and {freq}")
    device = _parse_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be a positive integer, got {args.threads}")
    run_args = {
        "dataset": args.dataset, "algorithm": args.algorithm, "test_envs": test_envs,
        "hparams": overrides or None, "hparams_seed": args.hparams_seed, "trial_seed": args.trial_seed,
        "seed": args.seed, "steps": steps, "checkpoint_freq": freq, "holdout_fraction": holdout,
        "data_dir": str(data_dir), "output_dir": str(args.output_dir),
    }
    try:
        # built here so that an impossible hparam (a negative width, say) is bad input, not a crash
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            algorithm = algorithm_class(dataset.input_shape, dataset.num_classes, len(dataset.environments) - len(test_envs), hparams)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return RunSetup(run_args, hparams, dataset, algorithm, device, Path(args.output_dir), args.skip_model_save)


def evaluate(algorithm: Algorithm, dataset: DomainDataset, splits: Dict[str, Any], device: torch.device) -> Dict[str, float]:
    """Accuracies in [0, 1], model in eval mode.

    ``env{i}_in_acc`` / ``env{i}_out_acc`` per split (DomainBed's names), and ``env{i}_acc``
    over the whole environment (in and out pooled), the test accuracy of the protocols that
    evaluate on the entire target domain.
    """
    algorithm.eval()
    counts = {}
    with torch.no_grad():
        for name, split in splits.items():
            correct = torch.zeros((), dtype=torch.long, device=device)
            total = 0
            for x, y in dataset.eval_batches(split, device):
                correct += correct_predictions(algorithm.predict(x), y).sum()
                total += len(y)
            counts[name] = (correct, total)
    algorithm.train()
    correct_values = torch.stack([c for c, _ in counts.values()]).tolist()  # one device sync
    accuracies = {}
    whole: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for (name, (_, total)), correct in zip(counts.items(), correct_values):
        accuracies[f"{name}_acc"] = correct / max(total, 1)
        env = name.rsplit("_", 1)[0]
        whole[env][0] += correct
        whole[env][1] += total
    for env, (correct, total) in whole.items():
        accuracies[f"{env}_acc"] = correct / max(total, 1)
    return accuracies


def _rng_state(device: torch.device, generator: torch.Generator) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng_state(state: Dict[str, Any], device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["batches"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def run_identity(args: Mapping[str, Any], hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """What defines a run, for ``run.json``: the arguments but where data and output live, and
    the resolved hparams."""
    identity = {k: v for k, v in args.items() if k not in ("data_dir", "output_dir")}
    identity["resolved_hparams"] = dict(hparams)
    return identity


def run(setup: RunSetup, show_progress: Optional[bool] = None) -> Path:
    """Train (or resume) the run described by ``setup``; returns the run directory."""
    out = setup.output_dir
    identity = run_identity(setup.args, setup.hparams)
    # a run resumes across hparams that change only how a number is computed
    ignored = type(setup.algorithm).IMPLEMENTATION_HPARAMS
    if (out / run_files.IDENTITY).exists():
        run_files.claim_run_dir(out, identity, ignored)  # a mismatch is refused before anything else
    if run_files.is_done(out):
        print(f"{out}: already done", file=sys.stderr)
        return out
    out.mkdir(parents=True, exist_ok=True)
    with run_files.RunLock(out):
        run_files.claim_run_dir(out, identity, ignored)
        # again under the lock: another process may have finished the run while we waited
        if run_files.is_done(out):
            print(f"{out}: already done", file=sys.stderr)
            return out
        _train(setup, out, show_progress)
    return out


def _train(setup: RunSetup, out: Path, show_progress: Optional[bool]) -> None:
    args, hparams, dataset, device = setup.args, setup.hparams, setup.dataset, setup.device
    test_envs, steps, freq = args["test_envs"], args["steps"], args["checkpoint_freq"]
    splits: Dict[str, Any] = {}
    train_splits = []
    for i, env in enumerate(dataset.environments):
        if hasattr(env, "to"):
            env = env.to(device)  # tensor-resident data: moved once, never copied per step
        inner, outer = split_environment(env, args["holdout_fraction"], seed_hash(args["trial_seed"], i))
        splits[f"env{i}_in"] = inner
        if outer is not None:
            splits[f"env{i}_out"] = outer
        if i not in test_envs:
            train_splits.append(inner)

    cuda_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(args["seed"])
        algorithm = setup.algorithm.to(device)
        generator = torch.Generator().manual_seed(seed_hash(args["seed"], "batches"))
        start_step = 0
        checkpoint_path = out / run_files.CHECKPOINT
        state = run_files.load_checkpoint(checkpoint_path, device) if checkpoint_path.exists() else None
        if state is not None:
            algorithm.load_checkpoint_state(state["algorithm"])
            _restore_rng_state(state["rng"], device, generator)
            start_step = state["step"]
        earlier = run_files.truncate_records(out, start_step)
        # one args / hparams per results file: a resumed run (from another data dir, say, or with
        # another implementation-only hparam) goes on writing those it started with
        record_args, record_hparams = (earlier[0]["args"], earlier[0]["hparams"]) if earlier else (args, hparams)

        batches = dataset.minibatches(train_splits, hparams["batch_size"], device, generator)
        logged: Dict[str, List[float]] = defaultdict(list)
        interval_start = time.perf_counter()
        interval_steps = 0
        # disable=None: a bar on a terminal, nothing in a log file
        bar = tqdm(range(start_step, steps), initial=start_step, total=steps,
                   disable=None if show_progress is None else not show_progress,
                   desc=f"{args['algorithm']} {args['dataset']}", leave=False, dynamic_ncols=True)
        for step in bar:
            for key, value in algorithm.update(next(batches)).items():
                logged[key].append(value)
            interval_steps += 1
            if step % freq == 0 or step == steps - 1:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_time = (time.perf_counter() - interval_start) / interval_steps
                record = {
                    "args": record_args, "hparams": record_hparams, "step": step,
                    "epoch": _epoch(step, hparams["batch_size"], train_splits),
                    "step_time": step_time,
                    **{key: sum(vals) / len(vals) for key, vals in logged.items()},
                    **evaluate(algorithm, dataset, splits, device),
                }
                if device.type == "cuda":
                    record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                run_files.append_record(out, record)
                run_files.atomic_torch_save(
                    {"algorithm": algorithm.checkpoint_state(), "rng": _rng_state(device, generator), "step": step + 1},
                    checkpoint_path,
                )
                _report(bar, record, test_envs)
                logged.clear()
                interval_start, interval_steps = time.perf_counter(), 0
        bar.close()
    if not setup.skip_model_save:
        run_files.atomic_torch_save(algorithm.state_dict(), out / run_files.MODEL)
    # done first: a kill between the two leaves a finished run, never one with neither file
    run_files.mark_done(out)
    checkpoint_path.unlink(missing_ok=True)


def _epoch(step: int, batch_size: int, train_splits: Sequence[Any]) -> float:
    """Passes over the smallest training split after ``step + 1`` updates."""
    smallest = min(len(split) for split in train_splits)
    per_step = smallest if batch_size == 0 else batch_size
    return (step + 1) * per_step / smallest


def _report(bar: tqdm, record: Dict[str, Any], test_envs: Sequence[int]) -> None:
    accs = " ".join(f"{k[:-4]}={v:.3f}" for k, v in sorted(record.items()) if k.endswith("_acc"))
    line = (f"step {record['step']}: loss={record.get('loss', float('nan')):.4g} "
            f"penalty={record.get('penalty', float('nan')):.4g} {accs} ({record['step_time']:.3f} s/step; test envs {list(test_envs)})")
    if bar.disable:
        print(line, flush=True)
    else:
        bar.write(line)


def _malloc_setting() -> str:
    try:
        return check_malloc_setting(os.environ.get(MALLOC_VARIABLE))
    except ValueError as err:
        raise UsageError(str(err)) from err


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status (0 ok, 2 bad input, 3 run dir busy)."""
    args = build_parser().parse_args(argv)
    try:
        malloc = _malloc_setting()
        setup = prepare(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if malloc == "retain":
        retain_freed_memory()
    try:
        run(setup)
    except run_files.RunDirMismatch as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except run_files.RunDirBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
