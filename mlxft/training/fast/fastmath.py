"""A fast SiLU (and tanh-approximated GELU) for training on mlx's CPU backend.

mlx's CPU exp/sigmoid/tanh are scalar: the SwiGLU of every block (silu(gate) * up) then costs
more than the block's three MLP matmuls, in the forward and again in the backward. Here the
sigmoid is built on fastexp.py's exp from fast ops (~4x mx.exp's speed; SiLU ~4.5x).
The SiLU has its own backward (s + x s (1 - s)), so the gradient does not go through the bit
tricks.

The same sigmoid gives GELU's tanh approximation (Gemma 3's MLP): 0.5 x (1 + tanh(u)) is
x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).

`fast_activations()` swaps mlx-lm's `swiglu` for this one in the model modules that use it,
mlx-lm's `scaled_dot_product_attention` for attention.py's, and `mlx.nn.gelu_approx` for
`gelu_approx` below, for the duration of a training run on the CPU
backend only (Metal and CUDA have fast transcendentals).

Inside it, two more exps over big arrays run as ONE fused kernel each (`mx.compile` on the CPU
generates C++ and builds it with g++ at run time, so fast_exp's 14 elementwise passes become one;
unfused they cost as much as mx.exp on big arrays):
- `exp_shifted(x, m)` = exp(x - m), the training loss's logsumexp/softmax over the vocabulary
  (mlxft/training/loss.py): exp(x - m) of a 16 MiB logits chunk 15 ms instead of 49 ms;
- the attention's softmax (attention.py, swapped in for mlx-lm's scaled_dot_product_attention):
  mlx's CPU softmax is scalar, ~16 of sdpa's ~21-28 ms forward for 8 rows x 135 tokens; fused
  the forward takes ~12-16 ms, with a fused backward as fast as mlx's; long sequences run in
  query chunks with a recomputing backward.
Without g++ on PATH mlx cannot build the kernels, and both stay mlx's own.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import sys

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu as stock_swiglu

from mlxft.models import families
from mlxft.training.fast.attention import attention
from mlxft.training.fast.fastexp import compiled, fast_exp

_STOCK_GELU_APPROX = nn.gelu_approx


_FUSED = {"on": False}  # inside fast_activations() on the CPU backend


@functools.lru_cache(maxsize=1)
def _fused_exp_shifted():
    """fast_exp(x - m) as one compiled CPU kernel, or None where mlx cannot build it (no g++)."""
    x = mx.zeros((2, 3))
    return compiled(lambda x, m: fast_exp(x - m), x, x[:, :1])


def fused_exp_available() -> bool:
    """True inside fast_activations() where the fused kernel can be built."""
    return _FUSED["on"] and _fused_exp_shifted() is not None


def exp_shifted(x: mx.array, m: mx.array) -> mx.array:
    """exp(x - m) for softmax-type reductions: the fused fast exp inside fast_activations() on the
    CPU for fp32, mx.exp everywhere else."""
    if x.dtype == mx.float32 and fused_exp_available():
        return _fused_exp_shifted()(x, m)
    return mx.exp(x - m)


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


def _swiglu_backward(gate: mx.array, x: mx.array, cotangent: mx.array) -> tuple[mx.array, mx.array]:
    s = _sigmoid(gate)
    return cotangent * x * (s * (1.0 + gate * (1.0 - s))), cotangent * (gate * s)


@functools.lru_cache(maxsize=1)
def _swiglu_kernels():
    """(silu(gate) * x, its two input gradients) as compiled CPU kernels, or None without g++.
    Measured at 2048 x 1536: forward and backward 72 -> 47 ms of CPU (mlx's compile still splits
    them at the exp's bit casts, but not at every one of its ~20 operations)."""
    x = mx.zeros((2, 3))
    forward = compiled(lambda gate, x: gate * _sigmoid(gate) * x, x, x)
    backward = compiled(_swiglu_backward, x, x, x)
    return (forward, backward) if forward is not None and backward is not None else None


@mx.custom_function
def _fused_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return _swiglu_kernels()[0](gate, x)


@_fused_swiglu.vjp
def _fused_swiglu_vjp(primals, cotangent, output):
    return _swiglu_kernels()[1](primals[0], primals[1], cotangent)


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's swiglu (silu(gate) * x) on the fast SiLU, as fused kernels where mlx can build them;
    other dtypes take mlx-lm's own."""
    if gate.dtype != mx.float32:
        return stock_swiglu(gate, x)
    if _swiglu_kernels() is not None:
        return _fused_swiglu(gate, x)
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
