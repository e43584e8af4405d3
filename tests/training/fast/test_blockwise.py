"""Checkpointing by blocks (mlxft/training/fast/blockwise.py) keeps the numerics and bounds memory:
loss and gradients equal the plain path's (LoRA on some or all blocks, dropout included, full
fine-tuning), a 30-step loss curve with train.grad_checkpoint=true stays within 1e-3 of the plain
run's, and at long rows the step keeps one block's activations alive where mlx-lm's checkpointing
keeps most of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlxft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from lora_fixtures import assert_matches_full_rows, encoded_rows, lora_model
from tiny_run import assert_curves_match, loss_curve

from mlxft.training.fast.blockwise import BlockwiseLoss, supports_blockwise
from mlxft.training.fast.paths import speed_paths
from mlxft.training.loss import lm_head
from mlxft.training.sft import collate, make_loss


@pytest.mark.parametrize("num_layers", [1, 2])
def test_blockwise_loss_and_grads_equal_the_plain_path(tiny_model, tiny_data, num_layers):
    model, tok = lora_model(tiny_model, num_layers, seed=0)
    rows = encoded_rows(tok, tiny_data)
    assert supports_blockwise(model, "llama")
    inputs, targets, idx, n_tok, n_sup = collate(rows)
    loss, grads = BlockwiseLoss(model, lm_head).loss_and_grad(model, inputs, targets, idx)
    mx.eval(loss, grads)
    assert_matches_full_rows(model, rows, loss, grads, n_tok, n_sup, loss_rtol=1e-6)


def test_blockwise_with_dropout_draws_the_forward_masks_again(tiny_model, tiny_data):
    """The recomputed block sees the dropout masks of its forward, and the random stream after the
    step is where the plain step leaves it."""
    model, tok = lora_model(tiny_model, 2, dropout=0.3, seed=0)
    model.train()
    inputs, targets, idx, _, _ = collate(encoded_rows(tok, tiny_data))
    mx.random.seed(7)
    loss_p, grads_p = nn.value_and_grad(model, make_loss(model, "llama"))(model, inputs, targets, idx)
    mx.eval(loss_p, grads_p)
    after_plain = mx.random.state[0].tolist()
    mx.random.seed(7)
    loss_b, grads_b = BlockwiseLoss(model, lm_head).loss_and_grad(model, inputs, targets, idx)
    assert mx.random.state[0].tolist() == after_plain
    assert abs(loss_b.item() - loss_p.item()) <= 1e-6 * abs(loss_p.item())
    flat_b, flat_p = dict(tree_flatten(grads_b)), dict(tree_flatten(grads_p))
    assert flat_b.keys() == flat_p.keys()
    for name, g in flat_p.items():
        assert float(mx.abs(flat_b[name] - g).max().item()) <= 1e-4 * (float(mx.abs(g).max().item()) + 1e-12), name


def test_full_fine_tuning_of_the_last_block_is_blockwise_too(tiny_model, tiny_data):
    from mlx_lm.utils import load

    model, tok = load(str(tiny_model))
    model.freeze()
    model.model.layers[-1].unfreeze()
    rows = encoded_rows(tok, tiny_data)
    assert supports_blockwise(model, "llama")
    inputs, targets, idx, n_tok, n_sup = collate(rows)
    loss, grads = BlockwiseLoss(model, lm_head).loss_and_grad(model, inputs, targets, idx)
    assert_matches_full_rows(model, rows, loss, grads, n_tok, n_sup, loss_rtol=1e-6)
    model.model.norm.unfreeze()  # something outside the blocks trains: mlx-lm's checkpointing instead
    assert not supports_blockwise(model, "llama")


def test_speed_paths_take_blockwise_checkpointing_for_sft_only(tiny_model):
    from mlxft.recipes import load_recipe

    recipe = load_recipe("smollm2-135m", tier=8, overrides=[f"model.source={tiny_model}", "train.grad_checkpoint=true"])
    paths = speed_paths(recipe)
    assert paths.grad_checkpoint and paths.blockwise and not paths.shared_prefix
    recipe.train.method = "dpo"
    assert not speed_paths(recipe).blockwise
    plain = load_recipe("smollm2-135m", tier=8, overrides=[f"model.source={tiny_model}"])
    assert not speed_paths(plain).blockwise


def test_checkpointed_loss_curve_matches_the_plain_run(tiny_model, tiny_data, tmp_path):
    plain = loss_curve(tmp_path / "plain", tiny_model, tiny_data, ["lora.num_layers=2"])
    checkpointed = loss_curve(tmp_path / "ckpt", tiny_model, tiny_data, ["lora.num_layers=2", "train.grad_checkpoint=true"])
    assert_curves_match(plain, checkpointed)
    run = sorted((tmp_path / "ckpt").glob("*/config.json"))[-1]
    assert json.loads(run.read_text())["recipe"]["train"]["grad_checkpoint"] is True


def _wide_model(trainable: int):
    """8 llama blocks, hidden 256, LoRA on the last `trainable`: wide enough that activations, not
    weights, make the peak."""
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    args = llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 512,
        "rope_theta": 10000.0, "tie_word_embeddings": True})
    mx.random.seed(0)
    model = llama.Model(args)
    model.freeze()
    linear_to_lora_layers(model, trainable, {"rank": 8, "scale": 2.0, "dropout": 0.0,
                                             "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]})
    mx.eval(model.parameters())
    return model


def _step_peak(step) -> int:
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(step())
    return mx.get_peak_memory() - base


def test_blockwise_memory_does_not_grow_with_the_trainable_blocks():
    """1 x 1024 tokens, LoRA on 2 and on 8 blocks: the plain step keeps every trainable block's
    activations (its peak grows with them); the blockwise one only each block's input on top of one
    block's recomputation."""
    L = 1024
    rng = np.random.default_rng(0)
    inputs = mx.array(rng.integers(0, 512, (1, L)).astype(np.int32))
    targets = mx.array(rng.integers(0, 512, (1, L)).astype(np.int32))
    idx = mx.arange(L // 2, L, dtype=mx.int32)
    peaks = {}
    for trainable in (2, 8):
        model = _wide_model(trainable)
        plain_grad = nn.value_and_grad(model, make_loss(model, "llama"))
        blockwise = BlockwiseLoss(model, lm_head)
        peaks[trainable] = (_step_peak(lambda: plain_grad(model, inputs, targets, idx)),
                            _step_peak(lambda: blockwise.loss_and_grad(model, inputs, targets, idx)))
    block_inputs = 6 * L * 256 * 4  # the 6 more blocks' saved inputs
    plain_growth = peaks[8][0] - peaks[2][0]
    assert plain_growth > 0.3 * peaks[8][0], peaks  # the plain step really keeps blocks alive
    assert peaks[8][1] - peaks[2][1] <= 2 * block_inputs, peaks
    assert peaks[8][1] < 0.5 * peaks[8][0], peaks
