"""exp for fp32 on mlx's CPU backend from fast ops, and the compiled kernels built on it.

mlx's CPU exp is scalar: `mx.exp` of a (128, 1536) fp32 array takes ~3.3 ms where numpy's takes
0.16 ms and a matmul producing that array 1.4 ms. Here exp is built from the ops mlx runs fast
(multiply, add, bit casts, shifts): 2^y = 2^n * 2^f with n = round(y) (the 1.5 * 2^23 rounding
trick) and 2^f a degree-6 polynomial on [-0.5, 0.5] (relative error 6e-9, below fp32 rounding);
measured max relative error against float64 1e-6 for |x| <= 20 (`mx.exp`: 9e-7), 5e-6 out to
+-87 where rounding x * log2(e) dominates, at ~4x the speed.

Over big arrays its 14 elementwise passes cost as much as mx.exp, so the softmaxes use it inside
ONE kernel each (`compiled`: `mx.compile` on the CPU generates C++ and builds it with g++ at run
time). Without g++ on PATH mlx cannot build kernels and the callers keep mlx's own ops.

A leaf module: the SiLU and loss exp (fastmath.py) and the attention (attention.py) both build on it.
"""

from __future__ import annotations

import shutil

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

LOG2E = 1.4426950408889634
_ROUND = 12582912.0  # 1.5 * 2**23: y + _ROUND rounds y to an integer held in the low mantissa bits
_ROUND_BITS = int(np.array(_ROUND, dtype=np.float32).view(np.int32))
# 2^f for f in [-0.5, 0.5], highest power first (least-squares fit, max relative error 6e-9).
_fit = np.linspace(-0.5, 0.5, 20001)
_COEFFS = [float(c) for c in np.polyfit(_fit, 2.0**_fit, 6)]
del _fit


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for fp32 x, from multiplies, adds and bit operations (see the module docstring)."""
    # Below 2^-126 (denormals) the result is ~0 anyway; above 2^127 fp32 overflows (e^88.7).
    y = mx.clip(x * LOG2E, -126.0, 127.0)
    r = y + _ROUND
    n = r.view(mx.int32) - _ROUND_BITS
    f = y - (r - _ROUND)
    p = _COEFFS[0]
    for c in _COEFFS[1:]:
        p = p * f + c
    return (p.view(mx.int32) + mx.left_shift(n, 23)).view(mx.float32)


def can_build_kernels() -> bool:
    """mlx builds compiled CPU kernels with g++ at run time: without it the fused kernels stay off."""
    return shutil.which("g++") is not None


def compiled(fn, *examples: mx.array):
    """`mx.compile(fn)` after one trial call on `examples`, or None where mlx cannot build it (no
    g++, or a compiler that fails)."""
    if not can_build_kernels():
        return None
    kernel = mx.compile(fn)
    try:
        mx.eval(kernel(*examples))
    except Exception:  # a compiler that fails: keep mlx's own ops
        return None
    return kernel
