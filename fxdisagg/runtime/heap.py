"""A worker's heap: keep what a call frees for the next call of the same shape; give it
back to the OS when the shape changes.

glibc serves every tensor of more than a few hundred KiB (every tile, every MLP
activation) from a fresh ``mmap`` and unmaps it on free, or, once its dynamic threshold
has risen, trims the top of the heap after the free. Either way the next call touches new
pages, and the kernel zeroes each 4 KiB page on its first touch. In a worker that repeats
calls of one shape this was pure waste: measured at (2, 2), N=2048 on 2 cores
(``benchmarks/runtime_cpu.py``), every call took 80-90 thousand page faults in the workers,
and an AttnNode's CPU per call fell from ~0.20 s to ~0.16 s without them.

- `keep_freed_memory` (once, when a spawned worker starts): tensors of up to 32 MiB (the
  largest threshold glibc accepts) come from the heap, and the heap is never trimmed on
  free, so a call reuses the pages the previous call freed.
- `release_freed_memory` (after a call whose shape differs from the previous call's): give
  every free page back (``malloc_trim``). Calls of varying lengths leave the heap
  fragmented, and without this a long-running worker's RSS drifted (CompNodes +6-10% over
  900 calls, ``benchmarks/memory_cpu.py``). A run of equal calls (repeated prefills,
  decode steps) keeps its pages.

Only processes fxdisagg owns change their allocator: the spawned workers, not the caller's
process (``launch="inprocess"``, or a torchrun rank, is the user's). Without glibc (musl,
macOS) both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1        # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 << 20
_NEVER_TRIM = 2 ** 31 - 1    # mallopt takes an int: the heap's top is trimmed past 2 GiB free


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _glibc()
if _LIBC is not None:
    _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _LIBC.mallopt.restype = ctypes.c_int
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]


def keep_freed_memory() -> bool:
    """Serve tensors up to 32 MiB from the heap and never trim it on free; False without
    glibc (nothing changed)."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)
                and _LIBC.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))


def release_freed_memory() -> None:
    """Give every free page of the heap back to the OS."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
