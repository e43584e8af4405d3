"""Sequence packing: a micro-batch's rows end to end in a few sequences, with no padding between them.

A padded batch spends the model's matmuls on pad tokens; a packed one does not. Packing puts
the rows of a micro-batch into a few bins (longest row first into the lightest bin, so the bins
come out about equally long) and runs each bin as one sequence, with

- a block-diagonal causal mask: a token sees only the earlier tokens of its own example, never
  a token of another example packed into the same bin (tests/training/fast/test_packing.py proves it);
- per-token RoPE positions that restart at every example, applied by the attention's own rope
  module (same frequencies, scaling and layout) called at an array of positions;

so each example's logits are those of the unpacked forward up to fp rounding. With the shared
prefix (mlxft/training/fast/prefix.py) the prefix still runs once and the suffixes are packed: a suffix token
sees every prefix key plus the earlier tokens of its own suffix, at positions P, P+1, ...

The price: attention runs over a whole bin (keys = bin length, mostly masked out) instead of one
row, so packing pays where padding is large (rows of very different lengths in one batch) and
costs a little where length-bucketed batches already leave little padding. Measured numbers in
README.md ("Sequence packing"). Families as in prefix.py (mlx-lm blocks with `self_attn.rope`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlxft.models import families
from mlxft.training.fast.prefix import SharedPrefixLoss, shared_hidden, supports_shared_prefix
from mlxft.training.loss import supervised_loss


def supports_packing(model: nn.Module, family: str) -> bool:
    """True where the blocks can be driven one by one (as the shared prefix needs) with an explicit
    mask and a swappable rope."""
    if family not in families.PACKING or not supports_shared_prefix(model, family):
        return False
    return all(isinstance(getattr(getattr(layer, "self_attn", None), "rope", None), nn.Module)
               for layer in model.model.layers)


# ---------------------------------------------------------------- layout


def assign_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices per bin: the fewest bins of at most `capacity` tokens, about equally full.

    Longest row first into the currently lightest bin (LPT), starting from ceil(total/capacity)
    bins and adding one until no bin overflows; a row longer than `capacity` gets a bin alone.
    Deterministic; rows keep their batch order inside a bin.
    """
    n = len(lengths)
    longest_first = sorted(range(n), key=lambda i: (-lengths[i], i))
    k = max(1, math.ceil(sum(lengths) / max(capacity, 1)))
    while True:
        bins, loads = [[] for _ in range(k)], [0] * k
        for i in longest_first:
            j = loads.index(min(loads))
            bins[j].append(i)
            loads[j] += lengths[i]
        if k >= n or max(loads) <= max(capacity, max(lengths)):
            return [sorted(b) for b in bins if b]
        k += 1


@dataclass
class PackedBatch:
    inputs: mx.array  # (K, C) token ids, examples end to end, zeros after a bin's last example
    targets: mx.array  # (K, C)
    idx: mx.array  # flat supervised positions in (K, C)
    positions: mx.array  # (K, C) RoPE position of each token: its index in its own example (+ offset)
    segments: mx.array  # (K, C) which example each token belongs to; -1 for the padding at bin ends
    n_tokens: int  # real tokens, a shared prefix counted once per row (as collate counts them)
    n_supervised: int


def pack(rows, capacity: int, skip: int = 0) -> PackedBatch:
    """Pack rows[i].ids[skip:] (inputs/targets shifted by one) into bins of at most `capacity` tokens.

    `skip` drops a shared prefix of that many tokens from every row; positions then start at `skip`.
    """
    lengths = [len(r.ids) - 1 - skip for r in rows]
    bins = assign_bins(lengths, capacity)
    C = max(sum(lengths[i] for i in b) for b in bins)
    shape = (len(bins), C)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    positions, segments = np.zeros(shape, np.int32), np.full(shape, -1, np.int32)
    mask = np.zeros(shape, bool)
    for k, b in enumerate(bins):
        at = 0
        for i in b:
            r, n = rows[i], lengths[i]
            inputs[k, at : at + n] = r.ids[skip:-1]
            targets[k, at : at + n] = r.ids[skip + 1 :]
            mask[k, at : at + n] = r.mask[skip + 1 :]
            positions[k, at : at + n] = np.arange(skip, skip + n)
            segments[k, at : at + n] = i
            at += n
    idx = np.flatnonzero(mask).astype(np.int32)
    n_tokens = sum(len(r.ids) - 1 for r in rows)
    return PackedBatch(
        mx.array(inputs), mx.array(targets), mx.array(idx), mx.array(positions), mx.array(segments), n_tokens, len(idx)
    )


def block_causal_mask(segments: mx.array, prefix_len: int = 0) -> mx.array:
    """(K, 1, C, prefix_len + C) bool: every prefix key, plus earlier-or-same tokens of the same example.

    Padding tokens (segment -1) see each other, so no query row is all-masked (no NaN); no real
    token sees them, and they are never supervised.
    """
    K, C = segments.shape
    pos = mx.arange(C)
    mask = (segments[:, :, None] == segments[:, None, :]) & (pos[None, :] <= pos[:, None])[None]
    if prefix_len:
        mask = mx.concatenate([mx.ones((K, C, prefix_len), dtype=mx.bool_), mask], axis=2)
    return mask[:, None]


# ---------------------------------------------------------------- per-token positions


class _TokenRope(nn.Module):
    """The attention's own rope module, applied at one position per token.

    mlx-lm calls `rope(x, offset=...)` with one offset for the whole sequence. mx.fast.rope
    (and every mlx-lm rope module, which ends in it) takes an array offset with one entry per
    batch element, so each token becomes its own batch element of length 1.
    """

    def __init__(self, rope: nn.Module, positions: mx.array):
        super().__init__()
        self.rope = rope
        self._positions = positions.reshape(-1)  # underscore: not a parameter

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        B, H, L, D = x.shape
        y = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
        y = self.rope(y, offset=self._positions)
        return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)


@contextlib.contextmanager
def rope_at(attention: nn.Module, positions: mx.array):
    """Within the block: the attention's rope runs at `positions` (K, C) instead of offset + index."""
    original = attention.rope
    attention.rope = _TokenRope(original, positions)
    try:
        yield
    finally:
        attention.rope = original


# ---------------------------------------------------------------- forwards


def packed_hidden(model: nn.Module, inputs: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
    """Final-norm hidden states (K, C, D) of packed bins."""
    inner = model.model
    h = inner.embed_tokens(inputs)
    for layer in inner.layers:
        with rope_at(layer.self_attn, positions):
            h = layer(h, mask)
    return inner.norm(h)


def packed_shared_hidden(
    model: nn.Module, first: int, prefix_h: mx.array, frozen_kv: list, inputs: mx.array, positions: mx.array, mask: mx.array
) -> mx.array:
    """Final-norm hidden states (K, C, D) of packed suffixes attending to the shared prefix.

    As prefix.shared_hidden: frozen blocks' prefix keys/values come from the run-long cache, the
    trainable blocks recompute the prefix (batch 1, plain rope) so gradients reach it.
    """
    return shared_hidden(model, first, prefix_h, frozen_kv, inputs, mask,
                         around=lambda layer: rope_at(layer.self_attn, positions))


class PackedLoss:
    """Loss (and gradients) of a micro-batch through the packed forward.

    The same quantity as `train.make_loss` on padded rows: mean cross-entropy over the supervised
    positions, with the head (`head(model, h)`) run only there (chunked where big: mlxft/training/loss.py). With `shared` (a SharedPrefixLoss)
    batches whose rows share a long enough prefix take the packed shared-prefix forward.
    `capacity`: the most tokens per bin (the recipe's max_seq_length in training).
    """

    def __init__(self, model: nn.Module, head, capacity: int, shared: SharedPrefixLoss | None = None):
        self.head = head
        self.capacity = capacity
        self.shared = shared
        self._plain_grad = nn.value_and_grad(model, self._plain_loss)
        self._shared_grad = nn.value_and_grad(model, self._shared_loss)

    def _ce(self, model, h, targets, idx):
        return supervised_loss(model, self.head, h.reshape(-1, h.shape[-1])[idx], targets.reshape(-1)[idx])

    def _plain_loss(self, model, inputs, targets, idx, positions, mask):
        return self._ce(model, packed_hidden(model, inputs, positions, mask), targets, idx)

    def _shared_loss(self, model, prefix_h, frozen_kv, inputs, targets, idx, positions, mask):
        h = packed_shared_hidden(model, self.shared.frozen.first, prefix_h, frozen_kv, inputs, positions, mask)
        return self._ce(model, h, targets, idx)

    def _args(self, rows):
        prefix_len = self.shared.prefix_length(rows) if self.shared is not None else 0
        b = pack(rows, self.capacity, skip=prefix_len)
        mask = block_causal_mask(b.segments, prefix_len)
        tail = (b.inputs, b.targets, b.idx, b.positions, mask)
        if not prefix_len:
            return b, False, tail
        prefix = mx.array(np.asarray(rows[0].ids[:prefix_len], dtype=np.int32)[None])
        return b, True, self.shared.frozen.get(prefix) + tail

    def loss_and_grad(self, model, rows):
        """(loss, grads, tokens, supervised tokens) of one micro-batch."""
        b, shared, args = self._args(rows)
        loss, grads = (self._shared_grad if shared else self._plain_grad)(model, *args)
        return loss, grads, b.n_tokens, b.n_supervised

    def loss(self, model, rows):
        """(loss, supervised tokens) of one micro-batch, no gradients (validation)."""
        b, shared, args = self._args(rows)
        return (self._shared_loss if shared else self._plain_loss)(model, *args), b.n_supervised
