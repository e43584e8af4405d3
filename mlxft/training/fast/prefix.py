"""Shared-prefix training forward: compute the prompt every row shares once, not B times.

Every row of a chat fine-tune starts with the same tokens (the chat template's system turn and
the user header; `mlxft data check` enforces one system prompt). On the commit-type data that is
43 of ~70 tokens per row. So for a batch we

- run the shared prefix through the model once (batch 1) and broadcast its keys/values to the
  rows, which attend to them as if the prefix were in front of each row (RoPE offset P, a
  causal mask shifted by P), so the numerics are those of the full rows up to fp rounding;
- keep, for the frozen blocks below the first trainable one, the prefix's keys/values and its
  hidden state at the first trainable block for the whole run: frozen weights never change, so
  that part is computed once per distinct prefix, not once per step;
- let gradients flow into the prefix through the trainable blocks (the rows' attention to the
  prefix keys/values), summed over the batch by the broadcast's vjp;
- run a batch of rows under several system prompts (task rows mixed with replay rows) as a group
  of rows per prompt, each with its own prefix, and take one loss over all their supervised
  positions (batch_groups), instead of falling back to full rows.

Only for families whose blocks take mlx-lm's `cache` protocol (offset + update_and_fetch) and
have no sliding-window layers; everything else uses the plain forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxft.data.encode import pad_rows
from mlxft.models import families
from mlxft.training.loss import supervised_loss

# Below this many shared tokens the bookkeeping costs more than it saves.
MIN_PREFIX = 8

# A batch splits into a group per prefix only when that saves this many times the prefix tokens
# that one prefix shared by all rows saves: each group adds its own, smaller, passes.
GROUP_GAIN = 1.25

# Suffix lengths are padded to a multiple of this, so a compiled step sees few shapes.
PAD_MULTIPLE = 8


class _Capture:
    """A one-shot 'cache' that records the prefix's (RoPE-rotated) keys and values."""

    offset = 0

    def update_and_fetch(self, keys, values):
        self.keys, self.values = keys, values
        return keys, values


class _Prefixed:
    """A 'cache' that puts the shared prefix's keys/values in front of every row's own."""

    def __init__(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        self.offset = keys.shape[2]

    def update_and_fetch(self, keys, values):
        shape = (keys.shape[0],) + self.keys.shape[1:]
        return (
            mx.concatenate([mx.broadcast_to(self.keys, shape), keys], axis=2),
            mx.concatenate([mx.broadcast_to(self.values, shape), values], axis=2),
        )


def supports_shared_prefix(model: nn.Module, family: str) -> bool:
    """True where the family's blocks take mlx-lm's cache protocol and can be driven one by one
    (embeddings, blocks, final norm; no sliding-window layers)."""
    inner = getattr(model, "model", None)
    if family not in families.SHARED_PREFIX or inner is None:
        return False
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm")):
        return False
    return not any(getattr(layer, "use_sliding", False) for layer in inner.layers)


def first_trainable_layer(model: nn.Module) -> int:
    """Index of the first block with trainable parameters (blocks below it are frozen)."""
    for i, layer in enumerate(model.model.layers):
        if tree_flatten(layer.trainable_parameters()):
            return i
    return len(model.model.layers)


def shared_prefix_length(rows) -> int:
    """Longest common prefix of the rows' ids, ending before the first supervised input position and
    leaving every row at least one input of its own (rows cut at max_seq_length before their answer
    can be identical and wholly unsupervised)."""
    first = rows[0].ids
    n = min(len(r.ids) for r in rows) - 2
    for r in rows:
        ids = np.asarray(r.ids[: n + 1])
        diff = np.flatnonzero(ids[:n] != np.asarray(first[:n]))
        n = min(n, int(diff[0]) if diff.size else n)
        sup = np.flatnonzero(r.mask)
        if sup.size:
            n = min(n, int(sup[0]) - 1)  # the target at input position sup-1 is supervised
    return max(n, 0)


@dataclass
class SharedBatch:
    prefix: mx.array  # (1, P) token ids every row starts with
    inputs: mx.array  # (B, S) the rest of each row's inputs, right-padded
    targets: mx.array  # (B, S)
    idx: mx.array  # flat supervised positions in (B, S)
    n_tokens: int  # real (unpadded) tokens in the batch, prefix counted per row
    n_supervised: int


def collate_shared(rows, prefix_len: int) -> SharedBatch:
    """Split rows into the shared prefix and right-padded suffixes (padded to PAD_MULTIPLE)."""
    P = prefix_len
    inputs, targets, mask = pad_rows(rows, skip=P, multiple=PAD_MULTIPLE)
    idx = np.flatnonzero(mask).astype(np.int32)
    prefix = np.asarray(rows[0].ids[:P], dtype=np.int32)[None]
    n_tokens = sum(len(r.ids) - 1 for r in rows)
    return SharedBatch(mx.array(prefix), mx.array(inputs), mx.array(targets), mx.array(idx), n_tokens, len(idx))


class FrozenPrefixCache:
    """Per distinct prefix: keys/values of the frozen blocks and the hidden state entering the first trainable one."""

    def __init__(self, model: nn.Module, max_entries: int = 8):
        self.model = model
        self.first = first_trainable_layer(model)
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[mx.array, list]] = {}

    def get(self, prefix: mx.array) -> tuple[mx.array, list]:
        key = np.asarray(prefix).tobytes()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._compute(prefix)
            if len(self._entries) >= self.max_entries:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = entry
        return entry

    def _compute(self, prefix: mx.array):
        inner = self.model.model
        h = inner.embed_tokens(prefix)
        kv = []
        for layer in inner.layers[: self.first]:
            cap = _Capture()
            h = layer(h, "causal" if h.shape[1] > 1 else None, cache=cap)
            kv.append((cap.keys, cap.values))
        h = mx.stop_gradient(h)
        kv = [(mx.stop_gradient(k), mx.stop_gradient(v)) for k, v in kv]
        mx.eval(h, kv)
        return h, kv


def shared_hidden(model: nn.Module, first: int, prefix_h: mx.array, frozen_kv: list, inputs: mx.array,
                  mask: mx.array | None = None, around=None) -> mx.array:
    """Final-norm hidden states of the suffix rows (B, S, D), attending to the shared prefix.

    `mask` defaults to the shifted causal mask of right-padded rows; `around(layer)` (a context
    manager factory) wraps each block's suffix call: packing passes its own mask and per-token rope.
    """
    inner = model.model
    P = prefix_h.shape[1]
    S = inputs.shape[1]
    if mask is None:
        # Row position i (absolute P+i) sees every prefix key and its own keys up to i.
        mask = mx.arange(P + S)[None, :] <= (mx.arange(S) + P)[:, None]
    h = inner.embed_tokens(inputs)
    hp = prefix_h
    for i, layer in enumerate(inner.layers):
        if i < first:
            keys, values = frozen_kv[i]
        else:
            cap = _Capture()
            hp = layer(hp, "causal" if P > 1 else None, cache=cap)
            keys, values = cap.keys, cap.values
        with around(layer) if around is not None else contextlib.nullcontext():
            h = layer(h, mask, cache=_Prefixed(keys, values))
    return inner.norm(h)


def split_by_prefix(rows, longer_than: int = 0) -> list[list[int]]:
    """The rows (indices) in groups that share a prefix of >= MIN_PREFIX tokens more than
    `longer_than` (what the whole batch shares): rows sorted by their tokens, each joining the
    group before it when it shares that much with the group's first row. A batch of task rows
    and replay rows under another system prompt splits in two."""
    need = longer_than + MIN_PREFIX
    order = sorted(range(len(rows)), key=lambda i: tuple(rows[i].ids[:128]))
    groups = [[order[0]]]
    for i in order[1:]:
        if shared_prefix_length([rows[groups[-1][0]], rows[i]]) >= need:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class _GroupPrefixed:
    """A 'cache' that puts each row's own group prefix keys/values (gathered, padded to the longest
    prefix) in front of the row's keys/values; RoPE offset = each row's own prefix length."""

    def __init__(self, keys: mx.array, values: mx.array, offsets: mx.array):
        self.keys, self.values, self.offset = keys, values, offsets

    def update_and_fetch(self, keys, values):
        return mx.concatenate([self.keys, keys], axis=2), mx.concatenate([self.values, values], axis=2)


def _pad_to(x: mx.array, n: int, axis: int) -> mx.array:
    if x.shape[axis] == n:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, n - x.shape[axis])
    return mx.pad(x, widths)


def grouped_hidden(model: nn.Module, first: int, prefixes: list, row_group: mx.array, offsets: mx.array,
                   inputs: mx.array) -> mx.array:
    """Final-norm hidden states of suffix rows (B, S, D) whose rows belong to different groups,
    each group with its own prefix: `prefixes` = per group (prefix hidden state at the first
    trainable block, frozen keys/values) from FrozenPrefixCache; `row_group` (B,) the group of each
    row; `offsets` (B,) its prefix length. The groups' prefixes run through the trainable blocks
    as one right-padded batch (causal, so padding never reaches a real position); every row sees
    its own group's prefix keys (the rest masked) and its own keys up to itself, RoPE at its
    prefix length: one batched pass, as with one shared prefix."""
    inner = model.model
    Pmax = max(h.shape[1] for h, _ in prefixes)
    S = inputs.shape[1]
    hp = mx.concatenate([_pad_to(h, Pmax, 1) for h, _ in prefixes], axis=0)
    frozen = [(mx.concatenate([_pad_to(kv[i][0], Pmax, 2) for _, kv in prefixes], axis=0),
               mx.concatenate([_pad_to(kv[i][1], Pmax, 2) for _, kv in prefixes], axis=0)) for i in range(first)]
    see_prefix = mx.arange(Pmax)[None, :] < offsets[:, None]  # (B, Pmax)
    causal = mx.arange(S)[None, :] <= mx.arange(S)[:, None]  # (S, S)
    mask = mx.concatenate([mx.broadcast_to(see_prefix[:, None, None, :], (inputs.shape[0], 1, S, Pmax)),
                           mx.broadcast_to(causal[None, None], (inputs.shape[0], 1, S, S))], axis=-1)
    h = inner.embed_tokens(inputs)
    for i, layer in enumerate(inner.layers):
        if i < first:
            keys, values = frozen[i]
        else:
            cap = _Capture()
            hp = layer(hp, "causal", cache=cap)
            keys, values = cap.keys, cap.values
        h = layer(h, mask, cache=_GroupPrefixed(keys[row_group], values[row_group], offsets))
    return inner.norm(h)


def array_offsets_work(model: nn.Module) -> bool:
    """Whether the model's RoPE takes one offset per row (mx.fast.rope does; some scaled variants
    do arithmetic on the offset): what grouped_hidden needs."""
    rope = getattr(getattr(model.model.layers[0], "self_attn", None), "rope", None)
    if rope is None:
        return False
    try:
        mx.eval(rope(mx.zeros((2, 1, 3, rope.dims if hasattr(rope, "dims") else 8)), offset=mx.array([0, 2])))
    except Exception:
        return False
    return True


def row_groups(groups: list[tuple[list[int], int]], n_rows: int) -> tuple[list[int], list[int]]:
    """Per row: (its group, its prefix length) from batch_groups' [(row indices, prefix length)];
    rows outside every group: group 0, prefix 0 (full rows)."""
    group, skips = [0] * n_rows, [0] * n_rows
    for g, (index, P) in enumerate(groups):
        for i in index:
            group[i], skips[i] = g, P
    return group, skips


def common_prefix(rows) -> int:
    """The prefix all the rows share, or 0 where it is too short to pay."""
    n = shared_prefix_length(rows)
    return n if n >= MIN_PREFIX else 0


def batch_groups(rows, several: bool = True) -> list[tuple[list[int], int]] | None:
    """How the shared-prefix forward runs a batch: [(row indices, their shared prefix length)], or
    None where the plain forward is the better path. One group when what all rows share saves the
    most; with `several` (grouped_hidden can run them), a group per prefix (split_by_prefix) when
    that saves GROUP_GAIN times more prefix tokens (rows under two system prompts share only the
    template's first tokens)."""
    n = shared_prefix_length(rows)
    whole = (len(rows) - 1) * n if n >= MIN_PREFIX else 0
    if several:
        split = [(g, shared_prefix_length([rows[i] for i in g])) for g in split_by_prefix(rows, n)]
        saved = sum((len(g) - 1) * p for g, p in split)
        if len(split) > 1 and saved > GROUP_GAIN * whole and all(p > 0 for _, p in split):  # every group has a prefix
            return split
    return [(list(range(len(rows))), n)] if whole else None


class SharedPrefixLoss:
    """Loss (and gradients) of a batch through the shared-prefix forward.

    The batch runs as one or more groups of rows, each with its own shared prefix (a batch of rows
    under two system prompts: two groups). `head(model, h)` maps final hidden states to logits; the
    loss is the mean cross-entropy over all the batch's supervised positions, the same quantity as
    `train.make_loss` computes on full rows.
    """

    def __init__(self, model: nn.Module, head):
        self.head = head
        self.frozen = FrozenPrefixCache(model)
        self.per_row_offsets = array_offsets_work(model)
        self._value_and_grad = nn.value_and_grad(model, self._loss)

    def prefix_length(self, rows) -> int:
        return common_prefix(rows)

    def groups(self, rows) -> list[tuple[list[int], int]] | None:
        """batch_groups(rows); several groups only where the model's RoPE takes per-row offsets."""
        return batch_groups(rows, several=self.per_row_offsets)

    def _loss(self, model, parts, targets):
        """parts: (prefix hidden state, frozen keys/values, suffix inputs, supervised idx) for one
        shared prefix; (prefixes, row groups, offsets, suffix inputs, idx) for several groups."""
        if len(parts) == 4:
            prefix_h, frozen_kv, inputs, idx = parts
            h = shared_hidden(model, self.frozen.first, prefix_h, frozen_kv, inputs)
        else:
            prefixes, row_group, offsets, inputs, idx = parts
            h = grouped_hidden(model, self.frozen.first, prefixes, row_group, offsets, inputs)
        return supervised_loss(model, self.head, h.reshape(-1, h.shape[-1])[idx], targets)

    def _args(self, rows, groups):
        if isinstance(groups, int):  # one prefix length for the whole batch
            groups = [(list(range(len(rows))), groups)]
        n_tokens = sum(len(r.ids) - 1 for r in rows)
        if len(groups) == 1:
            b = collate_shared(rows, groups[0][1])
            parts = (*self.frozen.get(b.prefix), b.inputs, b.idx)
            return (n_tokens, b.n_supervised), (parts, b.targets.reshape(-1)[b.idx])
        row_group, skips = row_groups(groups, len(rows))
        prefixes = [self.frozen.get(mx.array(np.asarray(rows[index[0]].ids[:P], dtype=np.int32)[None])) for index, P in groups]
        inputs, targets, mask = pad_rows(rows, skips, PAD_MULTIPLE)
        idx = mx.array(np.flatnonzero(mask).astype(np.int32))
        parts = (prefixes, mx.array(row_group), mx.array(skips), mx.array(inputs), idx)
        return (n_tokens, int(mask.sum())), (parts, mx.array(targets).reshape(-1)[idx])

    def loss_and_grad(self, model, rows, groups):
        """(loss, grads, tokens, supervised tokens) of one batch; `groups` from groups(), or one
        prefix length shared by all rows."""
        (n_tok, n_sup), args = self._args(rows, groups)
        loss, grads = self._value_and_grad(model, *args)
        return loss, grads, n_tok, n_sup

    def loss(self, model, rows, groups):
        """(loss, supervised tokens) of one batch, no gradients (validation)."""
        (_, n_sup), args = self._args(rows, groups)
        return self._loss(model, *args), n_sup
