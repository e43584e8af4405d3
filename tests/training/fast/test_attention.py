"""The training attention (mlxft/training/fast/attention.py) is mlx's attention: values and gradients
equal mx.fast.scaled_dot_product_attention's to 1e-5 for every mask kind and GQA/MHA, in one piece
and in query chunks; masked keys get exactly zero weight; and the chunked path's memory grows with
the sequence, not its square."""

from __future__ import annotations

import numpy as np
import pytest

import mlxft  # noqa: F401
import mlx.core as mx

from mlx_lm.models.base import scaled_dot_product_attention as stock_sdpa

from mlxft.training.fast import attention as attention_module
from mlxft.training.fast.attention import attention, chunk_rows, softmax_kernels

pytestmark = pytest.mark.skipif(softmax_kernels() is None, reason="mlx cannot build the fused CPU kernel here (no g++)")


@pytest.fixture(params=["one piece", "chunked"])
def path(request, monkeypatch):
    """Run the test through the one-piece path and through query chunks of 3 rows."""
    if request.param == "chunked":
        monkeypatch.setattr(attention_module, "SCORES_BYTES", 0)
        monkeypatch.setattr(attention_module, "CHUNK_BYTES", 1)
        monkeypatch.setattr(attention_module, "MIN_CHUNK_ROWS", 3)
    return request.param


def _attention_cases(L: int = 7, S: int = 11):
    rng = np.random.default_rng(4)
    B, H, KV, D = 3, 6, 2, 16
    bool_2d = np.arange(S)[None, :] <= np.arange(L)[:, None] + (S - L)
    bool_4d = rng.random((B, 1, L, S)) < 0.6
    bool_4d[..., 0] = True  # no all-masked row
    additive = np.where(rng.random((L, S)) < 0.7, 0.0, -1e9).astype(np.float32)
    additive[:, 0] = 0.0
    per_head = rng.random((B, H, L, S)) < 0.6
    per_head[..., 0] = True
    key_padding = rng.random((B, 1, 1, S)) < 0.8  # broadcast along the queries
    key_padding[..., 0] = True
    masks = {"none": None, "causal": "causal", "bool 2d": mx.array(bool_2d), "bool (B,1,L,S)": mx.array(bool_4d),
             "bool (B,H,L,S)": mx.array(per_head), "additive": mx.array(additive),
             "bool (B,1,1,S)": mx.array(key_padding)}
    for kv in (KV, H):  # grouped-query and plain multi-head
        q = mx.array(rng.normal(0, 2, (B, H, L, D)).astype(np.float32))
        k = mx.array(rng.normal(0, 2, (B, kv, S, D)).astype(np.float32))
        v = mx.array(rng.normal(0, 1, (B, kv, S, D)).astype(np.float32))
        for name, mask in masks.items():
            yield f"kv={kv} {name}", q, k, v, mask


def _close(a: mx.array, b: mx.array, what: str) -> None:
    assert float(mx.abs(a - b).max().item()) <= 1e-5 * float(mx.abs(a).max().item()), what


@pytest.mark.parametrize("L,S", [(7, 11), (11, 11)])
def test_attention_equals_mlx_sdpa_values_and_gradients(path, L, S):
    """Same outputs and gradients as mx.fast.scaled_dot_product_attention (queries after a prefix of
    keys, and queries == keys)."""
    for name, q, k, v, mask in _attention_cases(L, S):
        w = mx.array(np.random.default_rng(5).normal(size=q.shape).astype(np.float32))

        def loss(fn):
            return lambda q, k, v: (fn(q, k, v) * w).sum()

        stock = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
        fast = lambda q, k, v: attention(q, k, v, None, 0.25, mask)
        _close(stock(q, k, v), fast(q, k, v), f"{path} {name}")
        g_ref = mx.grad(loss(stock), argnums=(0, 1, 2))(q, k, v)
        g_got = mx.grad(loss(fast), argnums=(0, 1, 2))(q, k, v)
        for a, b, arg in zip(g_ref, g_got, "qkv"):
            _close(a, b, f"{path} {name} d{arg}")


def test_attention_gives_masked_keys_exactly_zero_weight(path):
    """Packing relies on it: what a query may not see cannot change its output, not even in the last bit."""
    rng = np.random.default_rng(6)
    q = mx.array(rng.normal(0, 3, (2, 4, 5, 8)).astype(np.float32))
    k = mx.array(rng.normal(0, 3, (2, 2, 9, 8)).astype(np.float32))
    v = mx.array(rng.normal(0, 1, (2, 2, 9, 8)).astype(np.float32))
    keep = np.ones((2, 1, 5, 9), bool)
    keep[:, :, :, 6:] = False  # keys 6.. are another example's
    mask = mx.array(keep)
    out = attention(q, k, v, None, 0.3, mask)
    k2 = mx.concatenate([k[:, :, :6], k[:, :, 6:] * 50 + 7], axis=2)  # huge scores there, masked
    v2 = mx.concatenate([v[:, :, :6], v[:, :, 6:] * -1e6], axis=2)
    assert mx.array_equal(out, attention(q, k2, v2, None, 0.3, mask)).item()


def test_short_rows_keep_the_one_piece_path_and_long_ones_are_chunked():
    assert chunk_rows(8, 9, 135, 135) == 135  # SmolLM2's default batches: unchanged
    rows = chunk_rows(1, 9, 4096, 4096)
    assert rows < 4096 and rows % 16 == 0


def _peak(fn, *args) -> int:
    mx.eval(*args)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn(*args))
    return mx.get_peak_memory() - base


def test_chunked_attention_memory_grows_with_the_sequence_not_its_square(monkeypatch):
    """Forward and backward of a causal attention at 2048 tokens: mlx's own keeps the scores and
    their softmax (2 x 151 MB, ~500 MB at the peak); the chunked path a few chunks' worth (mlx
    runs ahead of its evaluation by up to ~10 operations, each of up to one chunk)."""
    monkeypatch.setattr(attention_module, "CHUNK_BYTES", 4 * 2**20)
    H, KV, L, D = 9, 3, 2048, 64
    q = mx.random.normal((1, H, L, D))
    k, v = mx.random.normal((1, KV, L, D)), mx.random.normal((1, KV, L, D))

    def grad(fn):
        return lambda q, k, v: mx.grad(lambda q, k, v: fn(q, k, v, None, 0.125, "causal").sum(), argnums=(0, 1, 2))(q, k, v)

    stock = _peak(grad(stock_sdpa), q, k, v)
    chunked = _peak(grad(attention), q, k, v)
    assert chunk_rows(1, H, L, L) < L
    assert chunked < 0.25 * stock, (chunked, stock)
