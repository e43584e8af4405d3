"""The loss at supervised positions: chunked head == one-piece head, at a fraction of the memory;
the sparse head (hidden states gathered before the head) == the model's own full logits, for the
llama and gemma3_text families."""

from __future__ import annotations

import numpy as np
import pytest

import mlxft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn

from mlxft.training.fast import fastmath
from mlxft.training.loss import CHUNKED_PEAK_CHUNKS, FUSED_ONE_PIECE_COPIES, ONE_PIECE_COPIES, fused_one_piece, chunk_rows, logits_peak_bytes, supervised_loss
from mlxft.training.loss import lm_head
from mlxft.training.sft import make_loss

from lora_fixtures import assert_grads_close


def _llama(vocab: int, tie: bool, seed: int = 0):
    from mlx_lm.models import llama

    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "rope_theta": 10000.0, "tie_word_embeddings": tie,
    })
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def _gemma3(vocab: int, seed: int = 0):
    from mlx_lm.models import gemma3_text

    mx.random.seed(seed)
    args = gemma3_text.ModelArgs.from_dict({
        "model_type": "gemma3_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": vocab,
        "query_pre_attn_scalar": 16, "sliding_window": 8, "sliding_window_pattern": 2,
    })
    model = gemma3_text.Model(args)
    mx.eval(model.parameters())
    return model


def _batch(vocab: int, B=3, T=12, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (B, T)).astype(np.int32)
    targets = rng.integers(0, vocab, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.4
    idx = np.flatnonzero(mask).astype(np.int32)
    return mx.array(inputs), mx.array(targets), mx.array(idx)


@pytest.fixture(params=["mx.exp", "fused fast exp"])
def exp_kind(request):
    """The chunked loss's exp: mlx's, or the fused fast one training uses on the CPU."""
    if request.param == "mx.exp":
        yield
        return
    if fastmath._fused_exp_shifted() is None:
        pytest.skip("mlx cannot build the fused CPU kernel here (no g++)")
    with fastmath.fast_activations():
        yield


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_head_equals_one_piece_with_gradients(tie, exp_kind):
    """Full fine-tuning (every weight trainable, the head included): same loss and gradients."""
    vocab = 512
    model = _llama(vocab, tie)
    h = mx.random.normal((40, 32))
    targets = mx.array(np.random.default_rng(1).integers(0, vocab, 40).astype(np.int32))
    chunk = 7 * 4 * vocab  # 7 positions per chunk: 6 chunks, the last one short

    def loss(model, h, chunk_bytes):
        return supervised_loss(model, lm_head, h, targets, chunk_bytes)

    assert chunk_rows(40, vocab, chunk) == 7
    one, g_one = nn.value_and_grad(model, lambda m, h: loss(m, h, 2**40))(model, h)
    many, g_many = nn.value_and_grad(model, lambda m, h: loss(m, h, chunk))(model, h)
    assert abs(one.item() - many.item()) <= 1e-5 * abs(one.item())
    assert_grads_close(g_many, g_one)
    # and the gradient with respect to the hidden states (what LoRA below the head receives)
    gh_one = mx.grad(lambda h: loss(model, h, 2**40))(h)
    gh_many = mx.grad(lambda h: loss(model, h, chunk))(h)
    assert float(mx.abs(gh_one - gh_many).max().item()) <= 1e-5 * float(mx.abs(gh_one).max().item())


def test_chunked_head_keeps_less_memory(exp_kind):
    """A big vocabulary with many supervised positions: the chunked backward peaks far lower."""
    vocab, n = 16384, 1024  # one-piece logits: 64 MiB fp32, plus softmax and gradient
    model = _llama(vocab, tie=True)
    model.freeze()  # LoRA-style: the head is frozen; the gradient flows to the hidden states
    h = mx.random.normal((n, 32))
    targets = mx.array(np.random.default_rng(2).integers(0, vocab, n).astype(np.int32))
    mx.eval(h, targets)

    def peak(chunk_bytes):
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        g = mx.grad(lambda h: supervised_loss(model, lm_head, h, targets, chunk_bytes))(h)
        mx.eval(g)
        return mx.get_peak_memory() - base, g

    full, g_full = peak(2**40)
    chunked, g_chunked = peak(4 * 2**20)  # 4 MiB of logits per chunk: 64 positions
    assert full > 64 * 2**20  # the one-piece logits really were materialised
    assert chunked < 0.35 * full, (chunked, full)
    assert float(mx.abs(g_full - g_chunked).max().item()) <= 1e-5 * float(mx.abs(g_full).max().item())
    # What `mlxft plan` assumes for the head (mlxft/training/loss.py's measured constants), both ways.
    copies = FUSED_ONE_PIECE_COPIES if fastmath._FUSED["on"] else ONE_PIECE_COPIES  # a huge chunk: one piece
    assert 0.8 <= full / (n * vocab * 4 * copies) <= 1.15
    assert chunked <= 1.15 * CHUNKED_PEAK_CHUNKS * 4 * 2**20


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_sparse_head_loss_equals_full_logits(family):
    """The loss that runs the head only at supervised positions == cross-entropy of the model's logits."""
    vocab = 300
    model = _gemma3(vocab) if family == "gemma3_text" else _llama(vocab, tie=False)
    inputs, targets, idx = _batch(vocab)
    fast = make_loss(model, family)(model, inputs, targets, idx)
    logits = model(inputs).reshape(-1, vocab)[idx]
    ref = nn.losses.cross_entropy(logits.astype(mx.float32), targets.reshape(-1)[idx]).mean()
    assert abs(fast.item() - ref.item()) <= 1e-5 * abs(ref.item())


@pytest.mark.parametrize("tie", [True, False])
def test_fused_one_piece_loss_equals_mlx_cross_entropy(tie):
    """CPU training's one-piece loss (fused fast exp, softmax kept for the backward) against
    nn.losses.cross_entropy: the same loss and gradients, the head's weight included; and its peak
    stays within the plan's bound."""
    if fastmath._fused_exp_shifted() is None:
        pytest.skip("mlx cannot build the fused CPU kernel here (no g++)")
    vocab, n = 4096, 96
    model = _llama(vocab, tie)
    h = mx.random.normal((n, 32)) * 3
    targets = mx.array(np.random.default_rng(7).integers(0, vocab, n).astype(np.int32))
    assert fused_one_piece(n, vocab)
    stock, g_stock = nn.value_and_grad(model, lambda m, h: supervised_loss(m, lm_head, h, targets))(model, h)
    gh_stock = mx.grad(lambda h: supervised_loss(model, lm_head, h, targets))(h)
    with fastmath.fast_activations():
        fused, g_fused = nn.value_and_grad(model, lambda m, h: supervised_loss(m, lm_head, h, targets))(model, h)
        gh_fused = mx.grad(lambda h: supervised_loss(model, lm_head, h, targets))(h)
        mx.eval(fused, g_fused, gh_fused)
        model.freeze()
        mx.eval(h)
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(mx.grad(lambda h: supervised_loss(model, lm_head, h, targets))(h))
        peak = mx.get_peak_memory() - base
    assert abs(stock.item() - fused.item()) <= 1e-5 * abs(stock.item())
    assert_grads_close(g_fused, g_stock)
    assert float(mx.abs(gh_stock - gh_fused).max().item()) <= 1e-5 * float(mx.abs(gh_stock).max().item())
    assert peak <= 1.15 * logits_peak_bytes(n, vocab, fused=True)
    # targets whose logit is far (> 87) below the row's best: no exp underflow in the loss
    far = h * 300
    stock_far = supervised_loss(model, lm_head, far, targets)
    with fastmath.fast_activations():
        fused_far = supervised_loss(model, lm_head, far, targets)
    assert stock_far.item() > 100
    assert abs(stock_far.item() - fused_far.item()) <= 1e-5 * stock_far.item()
