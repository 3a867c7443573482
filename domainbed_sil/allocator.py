"""Keep freed CPU memory inside the process, so that large tensors are not page-faulted anew.

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with fresh pages
from the kernel and returns them on free.  A full-batch Colored MNIST step allocates and frees
tensors of 25,000 x 392 floats (39 MB) several times (SIL's score and its gradient), so every
one of them page-faults 9,600 pages that the kernel must zero first: the profile showed a
scalar multiply of such a tensor taking 47 ms instead of 6 ms, and a SIL step at hidden width
64 spending more than half its time in these faults (results/benchmarks.md).  Raising the mmap
and trim thresholds makes malloc reuse the heap instead; the process's peak memory is
unchanged up to heap fragmentation, it is only not handed back between steps.  The setting
is process-wide (``train.main`` makes it once, and ``$DOMAINBED_SIL_MALLOC=default`` turns it
off); where there is no glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Optional

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_ONE_GIB = 1 << 30
_INT_MAX = (1 << 31) - 1  # mallopt takes a C int


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


MALLOC_VARIABLE = "DOMAINBED_SIL_MALLOC"
MALLOC_SETTINGS = ("retain", "default")


def check_malloc_setting(value: Optional[str]) -> str:
    """The allocator setting named by ``$DOMAINBED_SIL_MALLOC`` (unset: ``retain``).

    ``retain``: ``retain_freed_memory()`` at start-up; ``default``: glibc's allocator as it is
    (for memory-tight processes that would rather page-fault than keep their peak resident).
    """
    setting = value or "retain"
    if setting not in MALLOC_SETTINGS:
        raise ValueError(f"${MALLOC_VARIABLE} must be one of {', '.join(MALLOC_SETTINGS)}, got {value!r}")
    return setting


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (process-wide, call once at start-up).

    Returns True when the setting took effect, False where there is no glibc (macOS, musl,
    Windows): there the allocator is left as it is, which is correct, only slower.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    # glibc before 2.35 refuses thresholds above 32 MiB, below our 39 MB tensors: there, mmap
    # is switched off altogether (every block then comes from the heap, which is what we want)
    served_from_heap = libc.mallopt(_M_MMAP_THRESHOLD, _ONE_GIB) == 1 or libc.mallopt(_M_MMAP_MAX, 0) == 1
    # a trim threshold above any step's frees: the heap is not shrunk and regrown every step
    return served_from_heap and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
