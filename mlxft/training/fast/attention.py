"""Attention for fp32 training on the CPU, swapped in for mlx-lm's scaled_dot_product_attention.

mlx's CPU attention (mx.fast.scaled_dot_product_attention falls back to plain ops there) writes
the whole (rows x heads x queries x keys) score array, its softmax and, for the backward, keeps
both: at 4096 tokens that is 600 MB per copy for SmolLM2's 9 heads, per block, and a causal
mask then throws half of it away. Its softmax's exp is scalar (~16 of ~21-28 ms of the forward
for 8 rows x 135 tokens).

`attention` is the same math (GQA groups, a "causal" / boolean / additive mask, exact zeros where
masked) in two forms:
- short sequences: the score array in one piece with the softmax's exp fused and fast
  (fastexp.py) and a fused backward: the path mlxft has always run on short rows;
- long sequences (the scores above `SCORES_BYTES`): query chunks of `chunk_rows` rows, each
  seeing only the keys its causal mask lets it see (half the work at long context), one chunk
  alive at a time (`mx.depends`). The forward keeps only the output and each query's
  logsumexp; the backward recomputes each chunk's scores from them (as flash attention does),
  so an attention's memory grows with the sequence, not its square. Each query's softmax is
  still taken over all its keys at once, so the numerics are the one-piece path's.
Anything else (attention sinks, quantized caches, fp16/bf16, no g++) takes mlx-lm's own.
"""

from __future__ import annotations

import functools

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention as stock_sdpa  # the module's own, never patched

from mlxft.training.fast.fastexp import compiled, fast_exp

# Above this many bytes of fp32 scores per attention call the chunked path runs (below it, the
# one-piece path, unchanged: SmolLM2's default batches, 8 x 135 tokens, have 5 MB).
SCORES_BYTES = 32 * 2**20
# Bytes of scores per chunk: the chunked forward and backward keep a few chunks' worth alive.
CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 32


@functools.lru_cache(maxsize=1)
def softmax_kernels():
    """(where(keep, fast_exp(x - m), 0), p * (g - s)) as compiled CPU kernels, or None without g++."""
    x, keep = mx.zeros((2, 3)), mx.ones((2, 3), dtype=mx.bool_)
    exp_kernel = compiled(lambda x, m, keep: mx.where(keep, fast_exp(x - m), 0.0), x, x[:, :1], keep)
    grad_kernel = compiled(lambda p, g, s: p * (g - s), x, x, x[:, :1])
    return (exp_kernel, grad_kernel) if exp_kernel is not None and grad_kernel is not None else None


def chunk_rows(batch: int, heads: int, queries: int, keys: int) -> int:
    """Query rows per chunk: all of them while the scores stay under SCORES_BYTES, else about
    CHUNK_BYTES of scores per chunk (a multiple of 16 rows)."""
    if batch * heads * queries * keys * 4 <= SCORES_BYTES:
        return queries
    rows = CHUNK_BYTES // (batch * heads * keys * 4)
    return max(MIN_CHUNK_ROWS, rows // 16 * 16)


@mx.custom_function
def _softmax(scores: mx.array, keep: mx.array) -> mx.array:
    """softmax over the last axis where `keep` (exact zeros elsewhere), with the fused fast exp."""
    x = mx.where(keep, scores, -mx.inf)
    e = softmax_kernels()[0](x, x.max(axis=-1, keepdims=True), keep)
    return e / e.sum(axis=-1, keepdims=True)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    p = output
    return softmax_kernels()[1](p, cotangent, (cotangent * p).sum(axis=-1, keepdims=True)), mx.zeros_like(primals[1])


def _grouped_mask(mask, B: int, H: int, KV: int, L: int, S: int):
    """(causal?, boolean or additive array broadcastable to (B, KV, H // KV, L, S) or None), or
    False for a mask layout this module does not take."""
    if mask is None:
        return False, None
    if isinstance(mask, str):  # "causal": query i (at position S - L + i) sees keys up to it
        return True, None
    if mask.ndim <= 2:
        return False, mask
    if mask.ndim == 4 and mask.shape[1] in (1, H):  # (B, 1 or H, L, S) in the grouped layout
        return False, mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], KV, H // KV, L, S)
    return None


def attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's `scaled_dot_product_attention` for fp32 training on the CPU (see the module docstring)."""
    if sinks is not None or hasattr(cache, "bits") or queries.dtype != mx.float32 or softmax_kernels() is None:
        return stock_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    B, H, L, D = queries.shape
    KV, S = keys.shape[1], keys.shape[2]
    grouped = _grouped_mask(mask, B, H, KV, L, S)
    if grouped is None:
        return stock_sdpa(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    causal, m = grouped
    q = queries.reshape(B, KV, H // KV, L, D)  # each key/value head serves H // KV query heads
    rows = chunk_rows(B, H, L, S)
    if rows < L:
        out = _chunked(rows, float(scale), causal, m is not None)(q, keys, values, *([m] if m is not None else []))[0]
        return out.reshape(B, H, L, values.shape[-1])
    scores = (q * scale) @ keys[:, :, None].swapaxes(-1, -2)  # (B, KV, H // KV, L, S)
    keep = _causal_keep(0, L, S - L, S) if causal else mx.array(True)
    if m is not None:
        if m.dtype == mx.bool_:
            keep = m
        else:
            scores = scores + m
    out = _softmax(scores, keep) @ values[:, :, None]
    return out.reshape(B, H, L, values.shape[-1])


def _causal_keep(a: int, b: int, shift: int, keys: int) -> mx.array:
    """(b - a, keys) bool: query a + i (at position shift + a + i) sees keys up to its position."""
    return mx.arange(keys)[None, :] <= (mx.arange(a, b) + shift)[:, None]


def _chunk_mask(m: mx.array, a: int, b: int, kc: int, L: int, S: int) -> mx.array:
    """Rows a:b and the first kc keys of a mask that may broadcast along either axis."""
    if m.ndim >= 2 and m.shape[-2] == L:
        m = m[..., a:b, :]
    return m[..., :kc] if m.shape[-1] == S and kc < S else m


def _chunk_scores(q, keys, a, b, kc, scale, causal, m, L, S):
    """(x, keep, scaled queries) of query rows a:b over the first kc keys: the scores (additive
    masks added) and where they count."""
    B, KV, G, _, D = q.shape
    qc = (q[:, :, :, a:b] * scale).reshape(B, KV, G * (b - a), D)
    x = (qc @ keys[:, :, :kc].swapaxes(-1, -2)).reshape(B, KV, G, b - a, kc)
    keep = _causal_keep(a, b, S - L, kc) if causal else mx.array(True)
    if m is not None:
        mc = _chunk_mask(m, a, b, kc, L, S)
        if mc.dtype == mx.bool_:
            keep = keep & mc
        else:
            x = x + mc
    return x, keep, qc


@functools.lru_cache(maxsize=32)
def _chunked(rows: int, scale: float, causal: bool, masked: bool):
    """The chunked attention as a custom function of (q (B, KV, G, L, D), keys, values[, mask])
    returning (output (B, KV, G, L, D), logsumexp (B, KV, G, L, 1))."""

    def spans(L: int, S: int):
        for a in range(0, L, rows):
            b = min(a + rows, L)
            yield a, b, (S - L + b if causal else S)  # keys a causal chunk can see

    @mx.custom_function
    def chunked(q, keys, values, *mask):
        m = mask[0] if masked else None
        B, KV, G, L, D = q.shape
        S = keys.shape[2]
        exp_kernel = softmax_kernels()[0]
        outs, lses, prev = [], [], None
        for a, b, kc in spans(L, S):
            qa = q if prev is None else mx.depends([q], [prev])[0]  # one chunk's scores alive at a time
            x, keep, _ = _chunk_scores(qa, keys, a, b, kc, scale, causal, m, L, S)
            top = mx.where(keep, x, -mx.inf).max(axis=-1, keepdims=True)
            e = exp_kernel(x, top, keep)
            total = e.sum(axis=-1, keepdims=True)
            # the softmax's division after the matmul: on (rows x head dim), not (rows x keys)
            prev = (e.reshape(B, KV, G * (b - a), kc) @ values[:, :, :kc]).reshape(B, KV, G, b - a, -1) / total
            outs.append(prev)
            lses.append(top + mx.log(total))
        return mx.concatenate(outs, axis=3), mx.concatenate(lses, axis=3)

    @chunked.vjp
    def chunked_vjp(primals, cotangents, outputs):
        q, keys, values, *mask = primals
        m = mask[0] if masked else None
        out, lse = outputs
        d_out = cotangents[0]
        B, KV, G, L, D = q.shape
        S = keys.shape[2]
        exp_kernel, grad_kernel = softmax_kernels()
        row_dot = (d_out * out).sum(axis=-1, keepdims=True)  # sum_j p_ij dP_ij, per query
        dq, dk, dv = [], None, None
        for a, b, kc in spans(L, S):
            qa = q if dk is None else mx.depends([q], [dk, dv])[0]  # after the previous chunk's key gradients
            x, keep, qc = _chunk_scores(qa, keys, a, b, kc, scale, causal, m, L, S)
            p = exp_kernel(x, lse[:, :, :, a:b], keep).reshape(B, KV, G * (b - a), kc)
            do = d_out[:, :, :, a:b].reshape(B, KV, G * (b - a), -1)
            dp = (do @ values[:, :, :kc].swapaxes(-1, -2)).reshape(B, KV, G, b - a, kc)
            ds = grad_kernel(p.reshape(dp.shape), dp, row_dot[:, :, :, a:b]).reshape(B, KV, G * (b - a), kc)
            dq.append((ds @ keys[:, :, :kc]).reshape(B, KV, G, b - a, D) * scale)
            dk_c = _pad_keys(ds.swapaxes(-1, -2) @ qc, S)
            dv_c = _pad_keys(p.swapaxes(-1, -2) @ do, S)
            dk, dv = (dk_c, dv_c) if dk is None else (dk + dk_c, dv + dv_c)
        zeros = [mx.zeros_like(mask[0])] if masked else []
        return [mx.concatenate(dq, axis=3), dk, dv, *zeros]

    return chunked


def _pad_keys(x: mx.array, S: int) -> mx.array:
    """(B, KV, kc, D) -> (B, KV, S, D), zeros for the keys a causal chunk did not see."""
    return x if x.shape[2] == S else mx.pad(x, [(0, 0), (0, 0), (0, S - x.shape[2]), (0, 0)])
