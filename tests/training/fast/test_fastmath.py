"""The CPU fast SiLU (mlxft/training/fast/fastmath.py) keeps the numerics: values and gradients equal nn.silu's to
fp32 rounding over the whole range (extremes, inf, NaN included), and a 30-step loss curve with it
stays within 1e-3 (relative) of the stock activation's."""

from __future__ import annotations


import numpy as np
import pytest

import mlxft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn

from tiny_run import assert_curves_match, loss_curve

from mlxft.training.fast.attention import softmax_kernels
from mlxft.training.fast.fastmath import fast_activations, fast_exp, silu


def test_fast_exp_matches_float64_exp():
    x = np.concatenate([np.linspace(-87, 88, 200001), np.random.default_rng(0).normal(0, 5, 10000)]).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    got = np.array(fast_exp(mx.array(x)), dtype=np.float64)
    err = np.abs(got / ref - 1)
    assert err[np.abs(x) <= 20].max() < 1.5e-6  # where SiLU's sigmoid is not saturated
    assert err.max() < 1e-5  # out to the ends of fp32's range: rounding x * log2(e) dominates
    # below the normal range it returns ~0 (2^-126), never garbage
    tiny = np.array(fast_exp(mx.array([-100.0, -1000.0, -np.inf], dtype=mx.float32)))
    assert (tiny >= 0).all() and (tiny < 1.2e-38).all()


def test_exp_shifted_is_the_fused_fast_exp_only_inside_fast_activations():
    from mlxft.training.fast import fastmath

    x = mx.array(np.random.default_rng(3).normal(0, 30, (64, 777)).astype(np.float32))
    m = x.max(axis=-1, keepdims=True)
    ref = np.exp(np.array(x - m, dtype=np.float64))
    assert mx.array_equal(fastmath.exp_shifted(x, m), mx.exp(x - m)).item()  # outside: mlx's own
    if fastmath._fused_exp_shifted() is None:
        pytest.skip("mlx cannot build the fused CPU kernel here (no g++)")
    with fast_activations():
        got = np.array(fastmath.exp_shifted(x, m), dtype=np.float64)
        nan = np.array(fastmath.exp_shifted(mx.array([[1.0, float("nan")]]), mx.array([[float("nan")]])))
    assert not np.array_equal(got, np.array(mx.exp(x - m)))  # really the other kernel
    big = ref > 1e-30
    assert (np.abs(got[big] / ref[big] - 1)).max() < 1e-5  # as fast_exp's own bound out to -87
    assert (got[~big] < 1.01e-30).all()  # underflow stays ~0
    assert np.isnan(nan).all()  # a NaN logit still poisons the loss, so divergence is caught


def test_silu_values_and_gradients_equal_stock():
    x = mx.array(np.concatenate([np.linspace(-120, 120, 100001), [0.0, -0.0, 1e-30, -1e-30]]).astype(np.float32))
    ref = nn.silu(x)
    got = silu(x)
    assert float(mx.abs(got - ref).max().item()) <= 2e-6 * max(1.0, float(mx.abs(ref).max().item()))
    rel = mx.abs(got - ref) / mx.maximum(mx.abs(ref), 1e-30)
    assert float(mx.where(mx.abs(ref) > 1e-20, rel, 0).max().item()) < 5e-6
    g_ref = mx.grad(lambda v: (nn.silu(v) * mx.cos(v)).sum())(x)
    g_got = mx.grad(lambda v: (silu(v) * mx.cos(v)).sum())(x)
    assert float(mx.abs(g_got - g_ref).max().item()) < 1e-5
    # inf/NaN stay non-finite (stock gives NaN for -inf, this -inf): the divergence guard still sees them
    odd = np.array(silu(mx.array([np.inf, -np.inf, np.nan], dtype=mx.float32)))
    assert odd[0] == np.inf and not np.isfinite(odd[1]) and np.isnan(odd[2])


def test_fused_swiglu_values_and_gradients_equal_stock():
    """The SwiGLU swapped into training (fused kernels where g++ builds them) against silu(gate) * x."""
    from mlxft.training.fast.fastmath import swiglu

    rng = np.random.default_rng(8)
    gate = mx.array(np.concatenate([np.linspace(-90, 90, 4001), rng.normal(0, 4, 3999)]).astype(np.float32).reshape(80, 100))
    x = mx.array(rng.normal(0, 2, (80, 100)).astype(np.float32))
    w = mx.array(rng.normal(size=(80, 100)).astype(np.float32))
    ref, got = nn.silu(gate) * x, swiglu(gate, x)
    assert float(mx.abs(got - ref).max().item()) <= 2e-6 * float(mx.abs(ref).max().item())
    g_ref = mx.grad(lambda g, x: ((nn.silu(g) * x) * w).sum(), argnums=(0, 1))(gate, x)
    g_got = mx.grad(lambda g, x: (swiglu(g, x) * w).sum(), argnums=(0, 1))(gate, x)
    for a, b in zip(g_ref, g_got):
        assert float(mx.abs(a - b).max().item()) <= 1e-5 * float(mx.abs(a).max().item())


def test_fast_activations_swaps_mlx_lm_swiglu_and_restores(tiny_model):
    from mlx_lm.models import llama
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model))
    inputs = mx.array([[1, 5, 9, 30, 2, 7]])
    stock = llama.swiglu
    ref = model(inputs)
    stock_attention = llama.scaled_dot_product_attention
    with fast_activations():
        assert llama.swiglu is not stock
        assert llama.scaled_dot_product_attention is not stock_attention or softmax_kernels() is None
        fast = model(inputs)
    assert llama.swiglu is stock and llama.scaled_dot_product_attention is stock_attention
    assert float(mx.abs(fast - ref).max().item()) <= 1e-5 * float(mx.abs(ref).max().item())
    with fast_activations(enabled=False):
        assert llama.swiglu is stock


def _curve(tiny_model, tiny_data, tmp_path, fast: bool) -> list[float]:
    return loss_curve(tmp_path / ("fast" if fast else "stock"), tiny_model, tiny_data,
                      ["lora.num_layers=2", f"train.fast_silu={'true' if fast else 'false'}"])


def test_loss_curve_with_fast_silu_matches_stock(tiny_model, tiny_data, tmp_path):
    stock = _curve(tiny_model, tiny_data, tmp_path, fast=False)
    fast = _curve(tiny_model, tiny_data, tmp_path, fast=True)
    assert_curves_match(stock, fast)


def test_gelu_approx_and_a_gemma3_forward_equal_stock():
    from mlx_lm.models import gemma3_text

    from mlxft.training.fast.fastmath import gelu_approx

    x = mx.array(np.linspace(-60, 60, 100001).astype(np.float32))
    ref = nn.gelu_approx(x)
    assert float(mx.abs(gelu_approx(x) - ref).max().item()) <= 2e-6 * float(mx.abs(ref).max().item())
    g_ref = mx.grad(lambda v: (nn.gelu_approx(v) * mx.cos(v)).sum())(x)
    g_got = mx.grad(lambda v: (gelu_approx(v) * mx.cos(v)).sum())(x)
    assert float(mx.abs(g_got - g_ref).max().item()) < 1e-5

    mx.random.seed(3)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict({
        "model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 300,
        "query_pre_attn_scalar": 16, "sliding_window": 8, "sliding_window_pattern": 2}))
    inputs = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    stock = nn.gelu_approx
    ref = model(inputs)
    with fast_activations():
        assert nn.gelu_approx is not stock
        fast = model(inputs)
    assert nn.gelu_approx is stock
    assert float(mx.abs(fast - ref).max().item()) <= 1e-5 * float(mx.abs(ref).max().item())
