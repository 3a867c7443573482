"""retain_freed_memory: large freed tensors stay in the process (each check in a fresh process,
since the setting is process-wide)."""
import platform
import subprocess
import sys

import pytest

from domainbed_sil import train
from domainbed_sil.allocator import check_malloc_setting

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


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt's thresholds and /proc are glibc-on-Linux behaviour")
def test_freed_large_tensor_stays_resident_only_after_retain_freed_memory():
    # default glibc: the 200 MB block was mmap'd and goes back to the kernel on free
    assert _resident_drop_after_free_mib("default") > 150
    # retained: the block stays in the heap for the next step's tensors
    assert _resident_drop_after_free_mib("retain") < 10


def test_malloc_setting_defaults_to_retain_and_rejects_unknown_values():
    assert check_malloc_setting(None) == check_malloc_setting("") == "retain"
    assert check_malloc_setting("default") == "default"
    with pytest.raises(ValueError, match=r"\$DOMAINBED_SIL_MALLOC must be one of retain, default, got 'jemalloc'"):
        check_malloc_setting("jemalloc")


def test_an_unknown_malloc_setting_stops_training_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOMAINBED_SIL_MALLOC", "jemalloc")
    assert train.main(["--output_dir", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: $DOMAINBED_SIL_MALLOC must be one of") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
