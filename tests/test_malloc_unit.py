"""core.malloc: large blocks stay on mmap after a larger one was freed (glibc)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from core.malloc import fix_mmap_threshold

# In a fresh interpreter: free a 1 MiB block (glibc raises its mmap threshold to 1 MiB
# unless it is fixed), then count the mmapped blocks a 300 KB allocation adds.
PROBE = """
import ctypes, sys
from core.malloc import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
big = bytearray(1 << 20)
del big
before = libc.mallinfo2().hblks
record = bytearray(300_000)
print(libc.mallinfo2().hblks - before)
"""


def _mmapped_blocks(mode: str) -> int:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=root
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_large_block_stays_on_mmap_once_the_threshold_is_fixed() -> None:
    assert _mmapped_blocks("default") == 0  # glibc's own behaviour: the heap took it
    assert _mmapped_blocks("fixed") == 1


def test_the_operators_own_threshold_wins() -> None:
    assert fix_mmap_threshold({"MALLOC_MMAP_THRESHOLD_": "65536"}) is False
