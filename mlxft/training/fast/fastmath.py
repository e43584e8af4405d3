"""A fast SiLU (and tanh-approximated GELU) for training on mlx's CPU backend.

mlx's CPU exp/sigmoid/tanh are scalar: on the build machines `mx.exp` of a (128, 1536) fp32
array takes ~3.3 ms where numpy's takes 0.16 ms and a matmul producing that array 1.4 ms. The
SwiGLU of every block (silu(gate) * up) then costs more than the block's three MLP matmuls, in
the forward and again in the backward. Here exp is built from the ops mlx runs fast (multiply,
add, bit casts, shifts): 2^y = 2^n * 2^f with n = round(y) (the 1.5 * 2^23 rounding trick) and
2^f a degree-6 polynomial on [-0.5, 0.5] (relative error 6e-9, below fp32 rounding); measured
max relative error against float64 1e-6 for |x| <= 20 (`mx.exp`: 9e-7), 5e-6 out to +-87 where
rounding x * log2(e) dominates, at ~4x the speed (SiLU ~4.5x).
The SiLU has its own backward (s + x s (1 - s)), so the gradient does not go through the bit
tricks.

The same sigmoid gives GELU's tanh approximation (Gemma 3's MLP): 0.5 x (1 + tanh(u)) is
x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).

`fast_activations()` swaps mlx-lm's `swiglu` for this one in the model modules that use it, and
`mlx.nn.gelu_approx` for `gelu_approx` below, for the duration of a training run on the CPU
backend only (Metal and CUDA have fast transcendentals).

Inside it, two more exps over big arrays run as ONE fused kernel each (`mx.compile` on the CPU
generates C++ and builds it with g++ at run time, so fast_exp's 14 elementwise passes become one;
unfused they cost as much as mx.exp on big arrays):
- `exp_shifted(x, m)` = exp(x - m), the training loss's logsumexp/softmax over the vocabulary
  (mlxft/training/loss.py): exp(x - m) of a 16 MiB logits chunk 15 ms instead of 49 ms;
- the attention's softmax (`attention`, swapped in for mlx-lm's scaled_dot_product_attention):
  mlx's CPU softmax is scalar, ~16 of sdpa's ~21-28 ms forward for 8 rows x 135 tokens; fused
  the forward takes ~12-16 ms, with a fused backward as fast as mlx's.
Without g++ on PATH mlx cannot build the kernels, and both stay mlx's own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import shutil
import sys

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as stock_swiglu
from mlx_lm.models.base import scaled_dot_product_attention as stock_sdpa  # the module's own, never patched

from mlxft.models import families

_STOCK_GELU_APPROX = nn.gelu_approx


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


_FUSED = {"on": False}  # inside fast_activations() on the CPU backend


def can_build_kernels() -> bool:
    """mlx builds compiled CPU kernels with g++ at run time: without it the fused kernels stay off."""
    return shutil.which("g++") is not None


@functools.lru_cache(maxsize=1)
def _fused_exp_shifted():
    """fast_exp(x - m) as one compiled CPU kernel, or None where mlx cannot build it (no g++)."""
    if not can_build_kernels():
        return None
    fn = mx.compile(lambda x, m: fast_exp(x - m))
    try:
        x = mx.zeros((2, 3))
        mx.eval(fn(x, x[:, :1]))
    except Exception:  # a compiler that fails: keep mx.exp
        return None
    return fn


def fused_exp_available() -> bool:
    """True inside fast_activations() where the fused kernel can be built."""
    return _FUSED["on"] and _fused_exp_shifted() is not None


def exp_shifted(x: mx.array, m: mx.array) -> mx.array:
    """exp(x - m) for softmax-type reductions: the fused fast exp inside fast_activations() on the
    CPU for fp32, mx.exp everywhere else."""
    if x.dtype == mx.float32 and fused_exp_available():
        return _fused_exp_shifted()(x, m)
    return mx.exp(x - m)


@functools.lru_cache(maxsize=1)
def _fused_softmax_kernels():
    """(where(keep, fast_exp(x - m), 0), p * (g - s)) as compiled CPU kernels, or None without g++."""
    if _fused_exp_shifted() is None:
        return None
    return (mx.compile(lambda x, m, keep: mx.where(keep, fast_exp(x - m), 0.0)),
            mx.compile(lambda p, g, s: p * (g - s)))


@mx.custom_function
def _softmax(scores: mx.array, keep: mx.array) -> mx.array:
    """softmax over the last axis where `keep` (exact zeros elsewhere), with the fused fast exp."""
    x = mx.where(keep, scores, -mx.inf)
    e = _fused_softmax_kernels()[0](x, x.max(axis=-1, keepdims=True), keep)
    return e / e.sum(axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    p = output
    return _fused_softmax_kernels()[1](p, cotangent, (cotangent * p).sum(axis=-1, keepdims=True)), mx.zeros_like(primals[1])


def attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention` for fp32 training on the CPU with the softmax's exp
    fused and fast (mlx's CPU softmax is scalar: ~16 of sdpa's ~21-28 ms for 8 rows x 135
    tokens); the same math: GQA groups, a "causal" / boolean / additive mask, exact zeros where
    masked. Anything else (attention sinks, quantized caches, fp16/bf16) takes mlx-lm's own."""
    if sinks is not None or hasattr(cache, "bits") or queries.dtype != mx.float32 or _fused_softmax_kernels() is None:
        return stock_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    B, H, L, D = queries.shape
    KV, S = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, KV, H // KV, L, D)  # each key/value head serves H // KV query heads
    scores = q @ keys[:, :, None].swapaxes(-1, -2)  # (B, KV, H // KV, L, S)
    keep = mx.array(True)
    if isinstance(mask, str):  # "causal": query i (at position S - L + i) sees keys up to it
        keep = mx.arange(S)[None, :] <= (mx.arange(L) + (S - L))[:, None]
    elif mask is not None:
        if mask.ndim <= 2:
            m = mask
        elif mask.ndim == 4 and mask.shape[1] in (1, H):  # (B, 1 or H, L, S) in the grouped layout
            m = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], KV, H // KV, L, S)
        else:
            return stock_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        if m.dtype == mx.bool_:
            keep = m
        else:
            scores = scores + m
    out = _softmax(scores, keep) @ values[:, :, None]
    return out.reshape(B, H, L, values.shape[-1])


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + fast_exp(-x))


@mx.custom_function
def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x) with the fast exp; NaN and inf in x come out as from nn.silu."""
    return x * _sigmoid(x)


@silu.vjp
def _silu_vjp(x, cotangent, output):  # one input: the primal and cotangent come unwrapped
    s = _sigmoid(x)
    return cotangent * s * (1.0 + x * (1.0 - s))


_GELU_C = math.sqrt(2 / math.pi)


def _gelu_arg(x: mx.array) -> mx.array:
    return 2 * _GELU_C * (x + 0.044715 * x * x * x)


@mx.custom_function
def gelu_approx(x: mx.array) -> mx.array:
    """mlx.nn.gelu_approx (tanh form) as x * sigmoid(2u) with the fast exp."""
    return x * _sigmoid(_gelu_arg(x))


@gelu_approx.vjp
def _gelu_approx_vjp(x, cotangent, output):
    s = _sigmoid(_gelu_arg(x))
    du = 2 * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return cotangent * (s + x * s * (1.0 - s) * du)


def _gelu_dispatch(x: mx.array) -> mx.array:
    return gelu_approx(x) if x.dtype == mx.float32 else _STOCK_GELU_APPROX(x)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's swiglu (silu(gate) * x) on the fast SiLU; other dtypes take mlx-lm's own."""
    if gate.dtype != mx.float32:
        return stock_swiglu(gate, x)
    return silu(gate) * x


@contextlib.contextmanager
def fast_activations(enabled: bool = True):
    """Within the block, mlx-lm's SwiGLU models use `swiglu` above and `exp_shifted` the fused
    fast exp (CPU backend only)."""
    if not enabled or mx.default_device().type != mx.DeviceType.cpu:
        yield
        return
    patched = []
    for name in dict.fromkeys(families.SWIGLU + families.FUSED_ATTENTION):
        module = sys.modules.get(f"mlx_lm.models.{name}")
        if module is None:
            try:
                module = importlib.import_module(f"mlx_lm.models.{name}")
            except ImportError:
                continue
        for attr, fast in (("swiglu", swiglu), ("scaled_dot_product_attention", attention)):
            if hasattr(module, attr) and name in (families.SWIGLU if attr == "swiglu" else families.FUSED_ATTENTION):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, fast)
    nn.gelu_approx = _gelu_dispatch
    fused, _FUSED["on"] = _FUSED["on"], True
    try:
        yield
    finally:
        _FUSED["on"] = fused
        nn.gelu_approx = _STOCK_GELU_APPROX
        for module, attr, original in patched:
            setattr(module, attr, original)
