"""glibc's allocator, set for processes that run for weeks.

glibc serves a large allocation (128 KiB and more) with its own mmap, returned to the
system when freed, but each such free raises the threshold to the freed size (up to
32 MiB). After a few large records (a 300 KB poison record, a 1 MiB fetch buffer), blocks
of that size come from the heap instead, and the heap, fragmented by smaller blocks that
outlive them, does not shrink: `herald ingest` catching up on a backlog with large records
kept 27 MB more RSS afterwards, and peaked 20 MB higher, than with the threshold fixed
(see README, "What the runs found"). Fixing it keeps large blocks on mmap for good.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, no longer raised


def fix_mmap_threshold(environ: dict[str, str] | None = None) -> bool:
    """Fix glibc's mmap threshold at 128 KiB; True when it was set. Does nothing off Linux,
    on a C library without ``mallopt``, or when ``MALLOC_MMAP_THRESHOLD_`` is in the
    environment (the operator's own value wins; glibc read it at start)."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in env:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
