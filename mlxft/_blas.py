"""Load an optimized BLAS before mlx.core so that mlx's CPU matmuls resolve to it.

The Linux ``mlx[cpu]`` wheel links the reference (netlib) BLAS, ~45x slower than
OpenBLAS. Loading OpenBLAS (or MKL) with RTLD_GLOBAL before ``import mlx.core``
makes mlx's cblas symbol look-ups land in the fast library. This module must not
import mlx itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings
from pathlib import Path

# Where the fast libraries live on common Linux systems, best first.
_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

FIX_HINT = (
    "install OpenBLAS (Debian/Ubuntu: `sudo apt-get install libopenblas0-pthread`) "
    "or point MLXFT_BLAS at an optimized libblas with cblas symbols"
)

loaded_path: str | None = None
status: str = "not attempted"


def _mkl_candidates() -> list[str]:
    """libmkl_rt from the PyPI `mkl` wheel, which exports standard cblas symbols."""
    out = []
    for base in {sys.prefix, sys.base_prefix}:
        out += [str(p) for p in Path(base, "lib").glob("libmkl_rt.so*")]
    return out


def candidates() -> list[str]:
    env = os.environ.get("MLXFT_BLAS")
    found = ctypes.util.find_library("openblas")
    names = ([env] if env else []) + _CANDIDATES + ([found] if found else []) + _mkl_candidates()
    return list(dict.fromkeys(names))


def load() -> str | None:
    """Load the first optimized BLAS found; return its path (None on macOS or if none)."""
    global loaded_path, status
    if loaded_path or status != "not attempted":
        return loaded_path
    if sys.platform != "linux" or os.environ.get("MLXFT_BLAS") == "none":
        status = "not needed" if sys.platform != "linux" else "disabled by MLXFT_BLAS=none"
        return None
    if "mlx.core" in sys.modules:
        status = "too late: mlx.core was imported before mlxft"
    for path in candidates():
        if path and (os.path.sep not in path or os.path.exists(path)):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_path = path
            if status == "not attempted":
                status = "loaded"
            return path
    status = "not found"
    return None


def warn_if_slow() -> None:
    """Warn once when mlx will fall back to the reference BLAS."""
    if sys.platform == "linux" and (status == "not found" or status.startswith("too late")):
        warnings.warn(
            f"mlxft: no optimized BLAS ({status}); mlx CPU matmuls will be ~45x slower. Fix: {FIX_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )


def serving_library(symbol: str = "cblas_sgemm") -> str | None:
    """Return the file of the shared library that global look-ups of `symbol` resolve to."""
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except AttributeError:
        return None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= addr < hi and len(parts) >= 6:
                    return os.path.realpath(parts[5])
    except OSError:
        return None
    return None
