"""The speed paths keep the numerics: the shared-prefix forward vs the plain full-row forward.

Tolerances: fp32 on CPU, the only difference is the order of the attention reductions, so the
loss and every gradient agree to 1e-5 (relative) on one batch, and a 30-step loss curve
stays within 1e-3 (relative) of the plain path's at every step.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlxft  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from conftest import SYSTEM
from lora_fixtures import assert_matches_full_rows, encoded_rows, lora_model
from tiny_run import assert_curves_match, loss_curve
from mlxft.training.fast.prefix import SharedPrefixLoss, first_trainable_layer, shared_prefix_length, supports_shared_prefix

LOSS_RTOL = 1e-5
CURVE_RTOL = 1e-3


@pytest.mark.parametrize("num_layers", [1, 2])
def test_shared_prefix_loss_and_grads_equal_full_rows(tiny_model, tiny_data, num_layers):
    from mlxft.training.loss import lm_head

    mx.random.seed(0)
    model, tok = lora_model(tiny_model, num_layers)
    rows = encoded_rows(tok, tiny_data)
    assert supports_shared_prefix(model, "llama")
    assert first_trainable_layer(model) == 2 - num_layers  # frozen blocks below: served from the cache
    shared = SharedPrefixLoss(model, lm_head)
    P = shared.prefix_length(rows)
    assert P >= 8  # system turn + user header
    loss_s, grads_s, n_tok, n_sup = shared.loss_and_grad(model, rows, P)
    assert_matches_full_rows(model, rows, loss_s, grads_s, n_tok, n_sup, loss_rtol=LOSS_RTOL)
    # The prefix's own gradient path matters: without it the lora grads of k/v would differ.
    assert any(float(mx.abs(g).max().item()) > 0 for n, g in tree_flatten(grads_s) if "k_proj.lora" in n)


def test_shared_prefix_stops_before_the_first_supervised_target(tiny_model, tiny_data):
    _, tok = lora_model(tiny_model)
    rows = encoded_rows(tok, tiny_data)
    P = shared_prefix_length(rows)
    for r in rows:
        assert not r.mask[: P + 1].any()  # no target inside the prefix is supervised
        assert list(r.ids[:P]) == list(rows[0].ids[:P])
    # Identical rows: the prefix still ends before the answer.
    same = [rows[0]] * 3
    assert shared_prefix_length(same) == int(np.flatnonzero(rows[0].mask)[0]) - 1


def test_qwen2_family_shared_prefix_matches(tiny_data, tmp_path):
    """A second family through the same cache protocol (attention with biases)."""
    from mlx_lm.models import qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from conftest import write_tokenizer
    from mlxft.training.sft import collate, make_loss
    from mlxft.training.loss import lm_head
    from mlx_lm.utils import load

    vocab = write_tokenizer(tmp_path)
    cfg = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab,
           "rope_theta": 10000.0, "tie_word_embeddings": False, "max_position_embeddings": 512}
    mx.random.seed(1)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(cfg))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, tok = load(str(tmp_path))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.k_proj", "self_attn.v_proj"]})
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.05)]))
    rows = encoded_rows(tok, tiny_data)
    shared = SharedPrefixLoss(model, lm_head)
    loss_s, _, _, _ = shared.loss_and_grad(model, rows, shared.prefix_length(rows))
    inputs, targets, idx, _, _ = collate(rows)
    loss_f = make_loss(model, "qwen2")(model, inputs, targets, idx)
    assert abs(loss_s.item() - loss_f.item()) <= LOSS_RTOL * abs(loss_f.item())


def _curve(tiny_model, tiny_data, tmp_path, shared: bool) -> list[float]:
    return loss_curve(tmp_path / ("shared" if shared else "plain"), tiny_model, tiny_data,
                      ["lora.num_layers=1", f"train.shared_prefix={'true' if shared else 'false'}"])


def test_loss_curve_with_shared_prefix_matches_plain_path(tiny_model, tiny_data, tmp_path):
    plain = _curve(tiny_model, tiny_data, tmp_path, shared=False)
    fast = _curve(tiny_model, tiny_data, tmp_path, shared=True)
    assert_curves_match(plain, fast, CURVE_RTOL)


def _without_system(data):
    """The tiny training rows without their system turn: encode_rows then puts one of our choosing."""
    from mlxft.data.encode import read_chat_jsonl

    return [{**r, "messages": [m for m in r["messages"] if m["role"] != "system"]}
            for r in read_chat_jsonl(data / "train.jsonl")]


def test_prefix_groups_batch_rows_under_one_system_prompt(tiny_model, tiny_data):
    """Two system prompts mixed: grouped batches come from one prompt (so the shared prefix runs
    once per batch); with one prompt the grouped order is exactly the plain length-bucketed one."""
    from mlxft.data.encode import encode_rows
    from mlxft.training.batches import batch_order, prefix_groups

    _, tok = lora_model(tiny_model)
    raw = _without_system(tiny_data)
    n, k = len(raw), len(raw) * 2 // 3
    assert n >= 24
    rows = encode_rows(tok, raw[:k], SYSTEM, 64) + encode_rows(tok, raw[k:], "Another prompt, quite different.", 64)
    rows += encode_rows(tok, raw[:3], "A rare prompt.", 64)  # fewer rows than a batch: pooled
    lengths = np.array([len(r.ids) for r in rows])
    groups = prefix_groups(rows, 4)
    assert len(set(groups[:k])) == 1 and len(set(groups[k:n])) == 1 and groups[0] != groups[k]
    assert set(groups[n:]) == {-1}

    def shared_batches(order):  # prefix tokens computed once per batch instead of per row
        return sum(shared_prefix_length([rows[i] for i in b]) for b in order)

    plain = batch_order(lengths, 4, seed=0, epoch=1)
    grouped = batch_order(lengths, 4, seed=0, epoch=1, groups=groups)
    # each group's last partial batch waits for another epoch: at most one batch per group fewer
    assert len(plain) - 3 <= len(grouped) <= len(plain)
    assert all(len(set(groups[b])) == 1 for b in grouped)  # no batch mixes system prompts
    assert shared_batches(grouped) > 1.2 * shared_batches(plain)
    again = batch_order(lengths, 4, seed=0, epoch=1, groups=groups)
    assert all((a == b).all() for a, b in zip(grouped, again))  # deterministic (resume)
    one = np.zeros(len(rows), dtype=int)
    assert all((a == b).all() for a, b in zip(batch_order(lengths, 4, 0, 1, one), plain))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_a_batch_under_several_system_prompts_runs_a_shared_prefix_per_group(tiny_model, tiny_data, num_layers):
    """Rows under two system prompts plus one under a third: a group per prompt, each prefix run
    once, and the loss, gradients and token counts equal the full rows'."""
    from mlxft.data.encode import encode_rows
    from mlxft.training.loss import lm_head

    model, tok = lora_model(tiny_model, num_layers, seed=0)
    raw = _without_system(tiny_data)[:7]
    rows = (encode_rows(tok, raw[:4], SYSTEM, 64) + encode_rows(tok, raw[4:6], "Another prompt, quite different.", 64)
            + encode_rows(tok, raw[6:], "A rare prompt.", 64))
    rows = [rows[i] for i in (4, 0, 6, 1, 5, 2, 3)]  # mixed, as a batch draws them
    shared = SharedPrefixLoss(model, lm_head)
    common = shared_prefix_length(rows)  # the chat template's system header, no more
    assert shared.per_row_offsets  # llama's RoPE takes one offset per row: the one-pass grouped forward
    groups = shared.groups(rows)
    assert sorted(sorted(g) for g, _ in groups) == [[0, 4], [1, 3, 5, 6], [2]]
    assert all(p >= common + 8 for _, p in groups)
    loss, grads, n_tok, n_sup = shared.loss_and_grad(model, rows, groups)
    loss_f = assert_matches_full_rows(model, rows, loss, grads, n_tok, n_sup, loss_rtol=LOSS_RTOL)
    loss_v, n_v = shared.loss(model, rows, groups)  # validation takes the same path
    assert n_v == n_sup and abs(loss_v.item() - loss_f.item()) <= LOSS_RTOL * abs(loss_f.item())
    # Every row under its own prompt: no group saves more than the header all rows share.
    alone = [encode_rows(tok, raw[i : i + 1], p, 64)[0] for i, p in enumerate(["Xylophones.", "Quiet, please.", "Zebra!"])]
    assert len(shared.groups(alone)) == 1
