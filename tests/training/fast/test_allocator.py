"""glibc keeps freed blocks inside `freed_memory_kept()` (mlxft/training/fast/allocator.py): a freed 24 MB
block stays mapped for reuse instead of going back to the kernel, and glibc's defaults return after."""

from __future__ import annotations

import ctypes
import os

import pytest

from mlxft.training.fast.allocator import freed_memory_kept, holds_freed_memory

pytestmark = pytest.mark.skipif(not holds_freed_memory(), reason="not glibc")
SIZE = 24 * 2**20


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _freed_block_stays() -> bool:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)  # touch every page
    before = _resident()
    libc.free(block)
    return _resident() > before - SIZE // 2


def test_freed_blocks_are_kept_inside_and_returned_after():
    with freed_memory_kept():
        assert _freed_block_stays()
    libc = ctypes.CDLL(None)
    libc.malloc_trim(0)  # what stayed mapped inside goes back now
    assert not _freed_block_stays()  # glibc's defaults again: a 24 MB block is mapped and unmapped


def test_disabled_changes_nothing():
    with freed_memory_kept(enabled=False):
        assert not _freed_block_stays()
