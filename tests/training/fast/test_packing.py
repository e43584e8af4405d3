"""Sequence packing keeps every example on its own: no attention across examples, same numerics.

Tolerances (fp32 on CPU; only the order of the attention reductions differs from the padded
path): logits of untouched examples are unchanged to 1e-6 when another packed example changes;
loss, per-example losses and every gradient agree with the unpacked path to 1e-5 relative
(gradients 1e-4 of their largest entry, as tests/integration/test_speed_numerics.py); a 30-step loss curve
stays within 1e-3 relative of the unpacked run at every step, plain and shared-prefix.
"""

from __future__ import annotations


import numpy as np
import pytest

import mlxft  # noqa: F401
import mlx.core as mx
import mlx.nn as nn

from lora_fixtures import assert_matches_full_rows, encoded_rows, lora_model
from tiny_run import assert_curves_match, loss_curve
from mlxft.training.fast.packing import (
    PackedLoss, _TokenRope, assign_bins, block_causal_mask, pack, packed_hidden, packed_shared_hidden, supports_packing,
)
from mlxft.training.fast.prefix import SharedPrefixLoss

LOSS_RTOL = 1e-5
ISOLATION_ATOL = 1e-6
CURVE_RTOL = 1e-3
ONE_BIN = 10_000  # capacity that puts the whole micro-batch in one sequence


def _changed(rows, which: int, skip: int):
    """rows with example `which` given other tokens (same length, same supervised mask) after `skip`."""
    from mlxft.data.encode import Encoded

    r = rows[which]
    ids = np.array(r.ids)
    ids[skip:] = (ids[skip:] * 7 + 3) % 200
    out = list(rows)
    out[which] = Encoded(ids=ids.astype(np.int32), mask=r.mask)
    return out


# ---------------------------------------------------------------- layout


def test_bins_hold_every_row_once_within_capacity_and_balanced():
    lengths = [70, 64, 90, 55, 61, 130, 72, 66]
    bins = assign_bins(lengths, 256)
    assert sorted(i for b in bins for i in b) == list(range(8))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert len(bins) == 3 and max(loads) <= 256
    assert max(loads) - min(loads) <= max(lengths)  # longest-first into the lightest bin
    assert assign_bins(lengths, 10_000) == [list(range(8))]
    assert [len(b) for b in assign_bins([300, 10], 100)] == [1, 1]  # a row over capacity gets a bin alone


def test_pack_positions_restart_per_example(tiny_model, tiny_data):
    _, tok = lora_model(tiny_model, seed=0)
    rows = encoded_rows(tok, tiny_data)
    b = pack(rows, ONE_BIN)
    seg, pos = np.array(b.segments[0]), np.array(b.positions[0])
    for i, r in enumerate(rows):
        assert list(pos[seg == i]) == list(range(len(r.ids) - 1))
    assert b.n_tokens == sum(len(r.ids) - 1 for r in rows) == b.inputs.size  # one bin: no padding at all
    b = pack(rows, ONE_BIN, skip=5)
    assert list(np.array(b.positions[0])[np.array(b.segments[0]) == 0]) == list(range(5, len(rows[0].ids) - 1))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("traditional", [False, True])
def test_token_rope_is_the_same_rope_at_each_position(scaling, traditional):
    from mlx_lm.models.rope_utils import initialize_rope

    rope = initialize_rope(16, 10000.0, traditional, scaling, 2048)
    x = mx.random.normal((2, 3, 7, 16))
    for offset in (0, 11):
        per_token = _TokenRope(rope, mx.broadcast_to(mx.arange(offset, offset + 7), (2, 7)))
        assert float(mx.abs(per_token(x) - rope(x, offset=offset)).max()) < 1e-6


# ---------------------------------------------------------------- isolation


def _shared_setup(model):
    from mlxft.training.loss import lm_head

    return SharedPrefixLoss(model, lm_head)


@pytest.mark.parametrize("path", ["plain", "shared_prefix"])
def test_no_attention_across_packed_examples(tiny_model, tiny_data, path):
    """Changing one packed example leaves every other example's logits unchanged; a plain causal
    mask over the same bin would not (the control shows the check catches leakage)."""
    from mlxft.training.loss import lm_head

    model, tok = lora_model(tiny_model, 2, seed=0)
    rows = encoded_rows(tok, tiny_data)
    shared = _shared_setup(model)
    skip = shared.prefix_length(rows) if path == "shared_prefix" else 0
    assert skip >= 8 or path == "plain"
    which = 3

    def logits(batch_rows, leaky: bool):
        b = pack(batch_rows, ONE_BIN, skip=skip)
        segments = mx.zeros_like(b.segments) if leaky else b.segments  # one segment = a plain causal mask
        mask = block_causal_mask(segments, skip)
        if skip:
            prefix = mx.array(np.asarray(batch_rows[0].ids[:skip], dtype=np.int32)[None])
            prefix_h, kv = shared.frozen.get(prefix)
            h = packed_shared_hidden(model, shared.frozen.first, prefix_h, kv, b.inputs, b.positions, mask)
        else:
            h = packed_hidden(model, b.inputs, b.positions, mask)
        return lm_head(model, h)[0], np.array(b.segments[0])

    for leaky in (False, True):
        before, seg = logits(rows, leaky)
        after, seg2 = logits(_changed(rows, which, skip), leaky)
        assert (seg == seg2).all()
        others = mx.array(np.flatnonzero((seg != which) & (seg >= 0)))
        itself = mx.array(np.flatnonzero(seg == which))
        moved_others = float(mx.abs(before[others] - after[others]).max())
        assert float(mx.abs(before[itself] - after[itself]).max()) > 1e-2  # the change is real
        if leaky:
            assert moved_others > 1e-3  # the same check catches attention across examples
        else:
            assert moved_others <= ISOLATION_ATOL


# ---------------------------------------------------------------- numerics vs the unpacked path


def _per_example_ce(logits_flat, targets_flat, owner):
    ce = np.array(nn.losses.cross_entropy(logits_flat.astype(mx.float32), targets_flat))
    return {int(i): float(ce[owner == i].mean()) for i in np.unique(owner)}


@pytest.mark.parametrize("capacity", [ONE_BIN, 40])
def test_packed_losses_and_grads_equal_unpacked(tiny_model, tiny_data, capacity):
    from mlxft.training.sft import collate
    from mlxft.training.loss import lm_head

    model, tok = lora_model(tiny_model, 2, seed=0)
    rows = encoded_rows(tok, tiny_data)
    packed = PackedLoss(model, lm_head, capacity)
    b = pack(rows, capacity)
    assert (b.inputs.shape[0] > 1) == (capacity != ONE_BIN)  # several bins where capacity is small
    loss_p, grads_p, n_tok, n_sup = packed.loss_and_grad(model, rows)
    assert_matches_full_rows(model, rows, loss_p, grads_p, n_tok, n_sup, loss_rtol=LOSS_RTOL)

    # Per example: each row's mean loss over its supervised tokens.
    inputs, targets, idx, _, _ = collate(rows)
    h = packed_hidden(model, b.inputs, b.positions, block_causal_mask(b.segments))
    logits = lm_head(model, h.reshape(-1, h.shape[-1])[b.idx])
    per_p = _per_example_ce(logits, b.targets.reshape(-1)[b.idx], np.array(b.segments).reshape(-1)[np.array(b.idx)])
    full = lm_head(model, model.model(inputs).reshape(-1, h.shape[-1])[idx])
    per_f = _per_example_ce(full, targets.reshape(-1)[idx], np.array(idx) // inputs.shape[1])
    assert per_p.keys() == per_f.keys() and len(per_p) == len(rows)
    for i in per_p:
        assert abs(per_p[i] - per_f[i]) <= LOSS_RTOL * abs(per_f[i]), i


@pytest.mark.parametrize("num_layers", [1, 2])
def test_packed_shared_prefix_equals_unpacked(tiny_model, tiny_data, num_layers):
    from mlxft.training.loss import lm_head

    model, tok = lora_model(tiny_model, num_layers, seed=0)
    rows = encoded_rows(tok, tiny_data)
    shared = SharedPrefixLoss(model, lm_head)
    packed = PackedLoss(model, lm_head, 40, shared=shared)
    loss_p, grads_p, n_tok, n_sup = packed.loss_and_grad(model, rows)
    loss_f = assert_matches_full_rows(model, rows, loss_p, grads_p, n_tok, n_sup, loss_rtol=LOSS_RTOL)
    loss_v, n_v = packed.loss(model, rows)
    assert n_v == n_sup and abs(loss_v.item() - loss_f.item()) <= LOSS_RTOL * abs(loss_f.item())


def test_supported_families(tiny_model):
    model, _ = lora_model(tiny_model, seed=0)
    assert supports_packing(model, "llama")
    assert not supports_packing(model, "gemma3_text")


# ---------------------------------------------------------------- training curves


def _curve(tiny_model, tiny_data, tmp_path, packing: bool, shared: bool) -> list[float]:
    return loss_curve(tmp_path / f"{packing}-{shared}", tiny_model, tiny_data, [
        "lora.num_layers=1", f"train.shared_prefix={str(shared).lower()}", f"train.packing={str(packing).lower()}"])


@pytest.mark.parametrize("shared", [False, True], ids=["plain", "shared_prefix"])
def test_loss_curve_with_packing_matches_unpacked(tiny_model, tiny_data, tmp_path, shared, monkeypatch):
    calls = {"train": 0, "valid": 0}
    for method, key in (("loss_and_grad", "train"), ("loss", "valid")):
        def counted(self, *a, _orig=getattr(PackedLoss, method), _key=key):
            calls[_key] += 1
            return _orig(self, *a)
        monkeypatch.setattr(PackedLoss, method, counted)
    unpacked = _curve(tiny_model, tiny_data, tmp_path, packing=False, shared=shared)
    assert calls == {"train": 0, "valid": 0}
    packed = _curve(tiny_model, tiny_data, tmp_path, packing=True, shared=shared)
    assert calls == {"train": 30, "valid": 3 * 2}  # every step and every validation batch went packed
    assert_curves_match(unpacked, packed, CURVE_RTOL)
