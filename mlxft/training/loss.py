"""The training loss at supervised positions, with the vocabulary projection chunked when it is big.

Every training forward (plain rows, shared prefix, packed bins) ends the same way: final hidden
states gathered at the supervised positions, the output head, mean cross-entropy. The logits
there are (supervised tokens x vocabulary) in fp32, plus their softmax and gradient of the same
size: for a 262k-token vocabulary (Gemma 3) and 2,000 supervised tokens that is ~2 GB per copy,
more than the rest of a small model's step. Above `CHUNK_BYTES` of logits the head and the
cross-entropy run over chunks of positions with a hand-written backward (softmax minus one-hot,
recomputed per chunk), and each chunk waits for the previous one (`mx.depends`), so only one
chunk's logits are alive at a time, forward or backward. The result is the same sum (fp32
reduction order aside). The head's weight gradient is built only when something asks for it
(full fine-tuning); with a frozen head mlx never evaluates it.
"""

from __future__ import annotations

import functools

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlxft.models import families
from mlxft.training.fast import fastmath

# fp32 logits per chunk. Measured (tests/training/test_loss.py, README): a chunked backward peaks at ~12
# chunks' worth whatever the number of positions; the one-piece head at 3 copies of all logits.
CHUNK_BYTES = 16 * 2**20
CHUNKED_PEAK_CHUNKS = 12
ONE_PIECE_COPIES = 3
# The fused one-piece loss (CPU training, fastmath): the fast exp's intermediates plus the softmax
# kept for the backward, measured 8 copies of the logits; used only while that stays within the
# chunked bound (for a 49k vocabulary up to 128 positions).
FUSED_ONE_PIECE_COPIES = 8


def fused_one_piece(n_positions: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> bool:
    return n_positions * vocab * 4 * FUSED_ONE_PIECE_COPIES <= chunk_bytes * CHUNKED_PEAK_CHUNKS


def chunk_rows(n_positions: int, vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk: all of them while one piece keeps no more than chunks would
    (3 x all logits <= 12 x one chunk; for a 49k vocabulary up to 341 positions)."""
    if n_positions * vocab * 4 * ONE_PIECE_COPIES <= chunk_bytes * CHUNKED_PEAK_CHUNKS:
        return max(n_positions, 1)
    return max(1, chunk_bytes // (4 * vocab))


def logits_peak_bytes(n_positions: int, vocab: int, chunkable: bool = True, fused: bool = False) -> int:
    """Peak bytes the head and loss keep for `n_positions` supervised tokens (for `mlxft plan`);
    `fused`: training on the CPU with the fused fast exp (fastmath)."""
    if fused and chunkable and fused_one_piece(n_positions, vocab):
        return n_positions * vocab * 4 * FUSED_ONE_PIECE_COPIES
    step = chunk_rows(n_positions, vocab) if chunkable else n_positions
    if step >= n_positions:
        return n_positions * vocab * 4 * ONE_PIECE_COPIES
    # ~12 chunks in flight, never more than there are (plus the one the backward recomputes)
    return step * vocab * 4 * min(CHUNKED_PEAK_CHUNKS, -(-n_positions // step) + 1)


def head_weight(model: nn.Module) -> mx.array | None:
    """The (vocab, dim) matrix the head multiplies by, or None where the head is not a plain
    bias-free projection (quantized, biased): those heads always run in one piece."""
    if getattr(model, "lm_head", None) is not None and not getattr(model.args, "tie_word_embeddings", False):
        head = model.lm_head
        plain = type(head) is nn.Linear and "bias" not in head
    else:
        head = model.model.embed_tokens
        plain = type(head) is nn.Embedding
    return head.weight if plain else None


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """Logits from final hidden states (the output projection, or the tied embeddings)."""
    if getattr(model, "lm_head", None) is not None and not getattr(model.args, "tie_word_embeddings", False):
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def has_sparse_head(model: nn.Module, family: str) -> bool:
    """Whether the head can run at supervised positions only (hidden states gathered before it)."""
    return family in families.SPARSE_HEAD and hasattr(model, "model")


def supervised_loss(model: nn.Module, head, h: mx.array, targets: mx.array, chunk_bytes: int = CHUNK_BYTES) -> mx.array:
    """Mean cross-entropy of `head(model, h)` against `targets`, h: (N, D) at supervised positions."""
    n = h.shape[0]
    if n == 0:
        return mx.array(0.0)
    weight = head_weight(model)
    step = n if weight is None else chunk_rows(n, weight.shape[0], chunk_bytes)
    if weight is not None and fastmath.fused_exp_available() and fused_one_piece(n, weight.shape[0], chunk_bytes):
        return _one_piece_ce_sum(h, weight, targets)[0] / n
    if step >= n:
        return nn.losses.cross_entropy(head(model, h).astype(mx.float32), targets).sum() / n
    return _chunked_ce_sum(step)(h, weight, targets)[0] / n


def _chunks(n: int, step: int):
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _logits(hc: mx.array, weight: mx.array) -> mx.array:
    return (hc @ weight.T).astype(mx.float32)  # what head(model, h).astype(fp32) computes


def _logsumexp(logits: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(logsumexp, exp(logits - max), its sum), over the last axis, kept 2-D, with fastmath's exp."""
    m = logits.max(axis=-1, keepdims=True)
    e = fastmath.exp_shifted(logits, m)
    total = e.sum(axis=-1, keepdims=True)
    return m + mx.log(total), e, total


@mx.custom_function
def _one_piece_ce_sum(h, weight, targets):
    """(sum_i CE(h_i @ W.T, t_i), softmax): the fused fast exp once, its softmax kept for the
    backward (no second exp, no recomputed head): N=100 x 49k head + loss 0.20 -> 0.11 s."""
    logits = _logits(h, weight)
    lse, e, total = _logsumexp(logits)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (lse - picked).sum(), e / total


@_one_piece_ce_sum.vjp
def _one_piece_ce_sum_vjp(primals, cotangents, outputs):
    h, weight, targets = primals
    p = _dlogits(outputs[1], targets, cotangents[0], h.dtype)
    return p @ weight, (p.T @ h).astype(weight.dtype), mx.zeros_like(targets)


def _dlogits(p: mx.array, targets: mx.array, cotangent: mx.array, dtype) -> mx.array:
    """The loss's gradient at the logits from their softmax p: (p - onehot(targets)) * cotangent."""
    t = targets[:, None]
    p = mx.put_along_axis(p, t, mx.take_along_axis(p, t, axis=-1) - 1.0, axis=-1)
    return (p * cotangent).astype(dtype)


@functools.lru_cache(maxsize=16)
def _chunked_ce_sum(step: int):
    """(sum_i CE(h_i @ W.T, t_i), logsumexp_i), computed `step` positions at a time (a
    custom_function per step). The exp is fastmath.exp_shifted: the fused fast exp when training
    on the CPU; the backward reuses the forward's logsumexp, so each chunk pays one exp pass there."""

    @mx.custom_function
    def ce_sum(h, weight, targets):
        total, lse = None, []
        for a, b in _chunks(h.shape[0], step):
            hc = h[a:b] if total is None else mx.depends([h[a:b]], [total])[0]
            logits = _logits(hc, weight)
            lse.append(_logsumexp(logits)[0].squeeze(-1))
            picked = mx.take_along_axis(logits, targets[a:b, None], axis=-1).squeeze(-1)
            part = (lse[-1] - picked).sum()
            total = part if total is None else total + part
        return total, mx.concatenate(lse)

    @ce_sum.vjp
    def ce_sum_vjp(primals, cotangents, outputs):
        h, weight, targets = primals
        cotangent, lse = cotangents[0], outputs[1]
        dh, dw, prev = [], None, None
        for a, b in _chunks(h.shape[0], step):
            hc = h[a:b] if prev is None else mx.depends([h[a:b]], [prev])[0]
            p = _dlogits(fastmath.exp_shifted(_logits(hc, weight), lse[a:b, None]), targets[a:b], cotangent, h.dtype)
            prev = p @ weight
            dh.append(prev)
            part = p.T @ hc  # evaluated only if the head's weight is trained
            dw = part if dw is None else dw + part
        return mx.concatenate(dh, axis=0), dw.astype(weight.dtype), mx.zeros_like(targets)

    return ce_sum
