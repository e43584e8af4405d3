"""Which process of a data-parallel run this is: rank 0 writes the run folder and prints.

A leaf module: checkpoints, run folders and the distributed engine (mlxft/training/distributed.py)
all ask it, so none of them needs another for that.
"""

from __future__ import annotations

_group = None  # the mx.distributed group once joined


def world():
    """The mx.distributed group mlx.launch (or mpirun) set up, joined on first use; a plain
    process is a group of one."""
    global _group
    if _group is None:
        import mlx.core as mx  # noqa: PLC0415  (lazy: reading run folders, e.g. `mlxft runs`, never loads mlx)

        _group = mx.distributed.init()
    return _group


def joined() -> bool:
    return _group is not None


def size() -> int:
    return 1 if _group is None else _group.size()


def rank() -> int:
    return 0 if _group is None else _group.rank()


def is_main() -> bool:
    """True on the rank that writes files and prints (always, outside a distributed run)."""
    return rank() == 0
