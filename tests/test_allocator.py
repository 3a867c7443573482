"""retain_freed_memory: large freed tensors stay in the process (each check in a fresh process,
since the setting is process-wide)."""
import subprocess
import sys

import pytest

_RSS_AFTER_FREE = """
import os, sys, torch
from domainbed_sil.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
x = torch.ones(50_000_000)  # 200 MB, far above glibc's default mmap threshold
before = resident_mib()
del x
print(before - resident_mib())
"""


def _resident_drop_after_free_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc are Linux-only")
def test_freed_large_tensor_stays_resident_only_after_retain_freed_memory():
    # default glibc: the 200 MB block was mmap'd and goes back to the kernel on free
    assert _resident_drop_after_free_mib("default") > 150
    # retained: the block stays in the heap for the next step's tensors
    assert _resident_drop_after_free_mib("retain") < 10
