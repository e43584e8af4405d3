"""glibc keeps freed blocks inside `freed_memory_kept()` (mlxft/training/fast/allocator.py): a freed 24 MB
block stays mapped for reuse instead of going back to the kernel, and glibc's defaults return after.

Each check runs in a fresh interpreter: in a long test process earlier tests leave free chunks in the
heap that a 24 MB malloc may reuse, which would keep it resident whatever the thresholds say."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlxft.training.fast.allocator import holds_freed_memory

pytestmark = pytest.mark.skipif(not holds_freed_memory(), reason="not glibc")

PROBE = r'''
import ctypes, os, sys
from mlxft.training.fast.allocator import freed_memory_kept
SIZE = 24 * 2**20
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def freed_block_stays():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)  # touch every page
    before = resident()
    libc.free(block)
    return resident() > before - SIZE // 2

out = []
for step in sys.argv[1].split(","):
    if step == "kept":
        with freed_memory_kept():
            out.append(freed_block_stays())
        libc.malloc_trim(0)  # what stayed mapped inside goes back now
    elif step == "disabled":
        with freed_memory_kept(enabled=False):
            out.append(freed_block_stays())
    else:
        out.append(freed_block_stays())
print(",".join(str(x) for x in out))
'''


def probe(steps: str) -> list[bool]:
    out = subprocess.run([sys.executable, "-c", PROBE, steps], capture_output=True, text=True, check=True).stdout
    return [x == "True" for x in out.strip().split(",")]


def test_freed_blocks_are_kept_inside_and_returned_after():
    # inside: kept; after: glibc's defaults again (a 24 MB block is mapped and unmapped)
    assert probe("kept,plain") == [True, False]


def test_disabled_changes_nothing():
    # (one block per fresh process: after glibc unmaps a freed block it raises its own mmap threshold,
    # so a second 24 MB block would stay whatever mlxft does)
    assert probe("disabled") == [False] == probe("plain")
