"""Keep freed memory in the process's heap, so that a training step reuses the pages of
the step before instead of faulting in fresh ones.

PyTorch has no caching allocator on the CPU (CUDA's keeps its blocks): every tensor is a
malloc and a free. glibc's malloc serves a request above its mmap threshold (128 KiB at
first, adapting upwards to at most 32 MiB) with its own mmap and gives it back with munmap,
and it trims the heap's top once 128 KiB or more lie free there. So each step's activations
(the small prior's are a few hundred KiB to a few MiB each) arrive as fresh pages that the
kernel zeroes at their first touch, one minor page fault per 4 KiB: ~10,000 faults per
update of the small prior at batch 16, ~8,000 per step of the small dVAE.

`keep_freed_heap` sets the mmap threshold to glibc's largest (32 MiB; this also stops its
adaptation) and the trim threshold to 2 GiB (mallopt takes an int), so freed blocks stay in
the heap and are reused. On 2 CPU threads (2026-12-03): 150 updates of the small prior 26.6 /
24.3 s -> 20.5 / 21.1 s (1.6M -> 0.15M faults); 65 steps of the small dVAE 10.9 / 12.2 s ->
10.1 / 10.5 s; `bench/heap.py` 1.18x on the prior's step.
The numbers computed are the same (only where memory comes from changes); the cost is that
the process keeps its peak heap instead of returning it between steps.

jemalloc or tcmalloc (LD_PRELOAD) do this and more, but must be installed and preloaded
before the process starts; this needs nothing. Outside glibc (macOS, musl) it does nothing.
DALLE_KEEP_FREED_HEAP=0 turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest mallopt accepts
TRIM_THRESHOLD = 2**31 - 1  # trim the heap's top only past 2 GiB free (mallopt takes an int)

_applied: list[bool] = []


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # not glibc: its mallopt options would mean something else or nothing
    return libc


def keep_freed_heap() -> bool:
    """Make glibc's malloc keep freed blocks for reuse (see the module doc); once per process.
    Returns whether it is in effect."""
    if _applied:
        return _applied[0]
    ok = False
    if os.environ.get("DALLE_KEEP_FREED_HEAP", "1") != "0":
        libc = _glibc()
        if libc is not None:
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            ok = (bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
                  and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
    _applied.append(ok)
    return ok


def freed_heap_kept() -> bool:
    """Whether `keep_freed_heap` is in effect in this process (without applying it): a
    condition stored with the speed figures a run reports (~1.2x on a CPU training step)."""
    return bool(_applied and _applied[0])


__all__ = ["freed_heap_kept", "keep_freed_heap"]
