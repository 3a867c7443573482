"""Seconds per Colored MNIST training step: the harness against a plain loop, SIL against ERM,
and achieved GFLOP/s against this machine's measured matmul peak.

    python benchmarks/cmnist_step.py            # full protocol size: 2 x 25,000 samples, hidden 390
    python benchmarks/cmnist_step.py --quick    # 2 x 5,000 samples, for a fast look
    python benchmarks/cmnist_step.py --hidden 64 --threads 1   # the quick sweeps' MLP, as one local job runs it
    python benchmarks/cmnist_step.py --malloc default          # glibc's allocator left as it is

The process's allocator is set as ``python -m domainbed_sil.train`` sets it (freed memory kept
for reuse, ``domainbed_sil.allocator``) unless ``--malloc default``; the plain loop runs in the
same process, so ratio (a) compares the maths and the code, and two runs with and without
``--malloc default`` show what the allocator setting buys.

Prints three ratios:
  (a) harness / plain     per algorithm (target <= 1.0): the harness must not be slower than a
                          straightforward single-file loop doing the same maths;
  (b) SIL / ERM           (target <= 2.2): double backprop costs about two ERM steps in FLOPs;
  (c) achieved / peak     GFLOP/s of each step (matmul FLOPs counted at the dispatcher) over
                          the GFLOP/s of a large float32 matmul measured here (target >= 0.6).
Random inputs with the real shapes stand in for the data: step time does not depend on values.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from domainbed_sil.algorithms import ALGORITHMS
from domainbed_sil.allocator import retain_freed_memory
from domainbed_sil.datasets import DATASETS
from domainbed_sil.hparams import apply_overrides, default_hparams

# (row label, algorithm, hparam overrides); "SIL autograd" is SIL with the direct input score
ROWS = [("ERM", "ERM", {}), ("IRM", "IRM", {}), ("VREx", "VREx", {}), ("SIL", "SIL", {}),
        ("SIL autograd", "SIL", {"score_norm_method": "autograd"})]


# ---- the plain reference: one file, the maths written out the straightforward way ----------
def plain_mlp(hidden: int, device) -> torch.nn.Module:
    lin1, lin2, lin3 = torch.nn.Linear(392, hidden), torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 1)
    for lin in (lin1, lin2, lin3):
        torch.nn.init.xavier_uniform_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    return torch.nn.Sequential(torch.nn.Flatten(), lin1, torch.nn.ReLU(), lin2, torch.nn.ReLU(), lin3).to(device)


def plain_step(name, mlp, opt, envs, hp):
    """One step as the IRM / REx scripts write it, SIL with one autograd.grad per environment."""
    nlls, penalties = [], []
    for x, y in envs:
        if name == "SIL":
            x = x.detach().requires_grad_(True)  # a view, as a careful plain loop would write it
        logits = mlp(x)
        nll = F.binary_cross_entropy_with_logits(logits[:, 0], y)
        if name == "IRM":
            scale = torch.tensor(1.0, requires_grad=True)
            g = torch.autograd.grad(F.binary_cross_entropy_with_logits(logits[:, 0] * scale, y), [scale], create_graph=True)[0]
            penalties.append(g.pow(2))
        if name == "SIL":
            s = torch.autograd.grad(nll, [x], create_graph=True)[0]
            penalties.append(s.norm())
        nlls.append(nll)
    nll = torch.stack(nlls).sum() if hp["env_loss_reduction"] == "sum" else torch.stack(nlls).mean()
    if name == "IRM":
        penalty = torch.stack(penalties).mean()
    elif name == "VREx":
        penalty = (nlls[0] - nlls[1]) ** 2
    elif name == "SIL":
        penalty = torch.stack(penalties).var().sqrt()
    else:
        penalty = torch.tensor(0.0)
    l2 = sum(p.norm().pow(2) for p in mlp.parameters())
    w = hp["penalty_weight"]  # benchmark the penalised phase (after warm-up)
    loss = nll + hp["l2_weight"] * l2 + w * penalty
    if w > 1:
        loss = loss / w
    opt.zero_grad()
    loss.backward(inputs=list(mlp.parameters()))  # SIL's x requires grad; nobody reads x.grad
    opt.step()
    return loss.item()


# ---- measurement helpers ----------------------------------------------------------------------
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps, repeats: int, device: torch.device, warmup: int = 2):
    """Median seconds of each callable in ``steps``, timed in turn within every repeat.

    Alternating the candidates spreads the shared machine's drifting load over all of them.
    """
    for step in steps:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, record in zip(steps, times):
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


class MatmulFlops(TorchDispatchMode):
    """Counts 2*m*k*n for every matrix product dispatched (the MLP's cost is in its matmuls).

    torch's FlopCounterMode cannot follow autograd.grad on leaf inputs (SIL's score), so the
    count is done at the dispatcher level here.
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet in (torch.ops.aten.mm, torch.ops.aten.addmm):
            a, b = args[-2], args[-1]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


def count_flops(step) -> int:
    with MatmulFlops() as counter:
        step()
    return counter.flops


def matmul_peak_gflops(device, size: int = 2048, repeats: int = 10) -> float:
    """The best of ``repeats`` float32 ``size`` x ``size`` products: the machine's attainable rate."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 x 5,000 samples instead of 2 x 25,000")
    parser.add_argument("--hidden", type=int, default=390)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="retain: as the training CLI sets it; default: glibc's own behaviour")
    parser.add_argument("--rows", nargs="+", default=[label for label, _, _ in ROWS],
                        choices=[label for label, _, _ in ROWS])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = retain_freed_memory() if args.malloc == "retain" else False
    device = torch.device(args.device)
    n = 5_000 if args.quick else 25_000
    gen = torch.Generator().manual_seed(0)
    envs = [((torch.rand(n, 2, 14, 14, generator=gen)).to(device), (torch.rand(n, generator=gen) < 0.5).float().to(device))
            for _ in range(2)]

    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {device}, 2 x {n} samples, hidden {args.hidden}, "
          f"freed memory retained: {retained}")
    peak = matmul_peak_gflops(device)
    print(f"matmul peak (float32 2048^2): {peak:.1f} GFLOP/s")
    harness_times = {}
    print(f"{'algorithm':<13} {'harness s':>10} {'plain s':>9} {'(a) ratio':>10} {'GFLOP/step':>11} {'GFLOP/s':>8} {'(c) /peak':>10}")
    for label, name, overrides in ROWS:
        if label not in args.rows:
            continue
        hp = apply_overrides(default_hparams(ALGORITHMS.get(name), DATASETS.get("ColoredMNIST")),
                             {"hidden_dim": args.hidden, "warmup_steps": 0, **overrides})
        torch.manual_seed(0)
        algorithm = ALGORITHMS.get(name)((2, 14, 14), 2, 2, hp).to(device)
        harness_step = lambda: algorithm.update(envs)
        torch.manual_seed(0)
        mlp = plain_mlp(args.hidden, device)
        opt = torch.optim.Adam(mlp.parameters(), lr=hp["lr"])
        plain = lambda: plain_step(name, mlp, opt, envs, hp)
        harness, reference = time_interleaved([harness_step, plain], args.repeats, device)
        harness_times[label] = harness
        flops = count_flops(harness_step)
        gflops = flops / harness / 1e9
        print(f"{label:<13} {harness:>10.3f} {reference:>9.3f} {harness / reference:>10.2f} {flops / 1e9:>11.1f} {gflops:>8.1f} {gflops / peak:>10.2f}")
    for label in ("SIL", "SIL autograd"):
        if label in harness_times and "ERM" in harness_times:
            print(f"(b) {label} / ERM step time: {harness_times[label] / harness_times['ERM']:.2f}  (target <= 2.2)")
    print(f"matmul peak again at the end: {matmul_peak_gflops(device):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
