"""How many CPU cores this process may use (the launcher's job packing, DataLoader workers)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores in this process's affinity mask (what SLURM or taskset granted), else all cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # sched_getaffinity is Linux-only
        return os.cpu_count() or 1
