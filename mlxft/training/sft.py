"""Supervised fine-tuning: next-token loss on every assistant turn (`train.method: sft`, the default).

The objective picks its forward ONCE, when it is attached to the model (fast/paths.py says
which): plain padded rows, the shared-prefix forward (the prompt every row shares runs once per
batch, fast/prefix.py), packed bins (fast/packing.py) or, with checkpointing, padded rows whose
backward runs one block at a time (fast/blockwise.py). All of them compute the same loss: the
mean cross-entropy over the batch's supervised positions, with the head run only there where
the family allows (loss.py).
"""

from __future__ import annotations

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlxft.config import Recipe
from mlxft.data.encode import Encoded, pad_rows
from mlxft.data.training_data import TrainingData
from mlxft.errors import DataError
from mlxft.training.batches import EpochBatches
from mlxft.training.fast.blockwise import BlockwiseLoss
from mlxft.training.fast.packing import PackedLoss
from mlxft.training.fast.paths import SpeedPaths
from mlxft.training.fast.prefix import SharedPrefixLoss
from mlxft.training.loss import has_sparse_head, lm_head, supervised_loss
from mlxft.training.objective import Objective


def collate(rows: list[Encoded]):
    """Right-pad to the longest row; return inputs, targets and flat supervised positions."""
    inputs, targets, mask = pad_rows(rows)
    idx = np.flatnonzero(mask).astype(np.int32)
    n_tokens = sum(len(r.ids) - 1 for r in rows)
    return mx.array(inputs), mx.array(targets), mx.array(idx), n_tokens, len(idx)


def make_loss(model: nn.Module, family: str):
    """Mean cross-entropy over supervised positions; the head runs only at those positions."""
    sparse = has_sparse_head(model, family)

    def loss_fn(model, inputs, targets, idx):
        if sparse:
            h = model.model(inputs)
            # The head only at supervised positions, chunked when its logits are big (loss.py).
            return supervised_loss(model, lm_head, h.reshape(-1, h.shape[-1])[idx], targets.reshape(-1)[idx])
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[idx]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets.reshape(-1)[idx])
        return ce.sum() / max(int(idx.size), 1)

    return loss_fn


class PlainForward:
    """Padded rows through the whole model."""

    def __init__(self, model: nn.Module, family: str):
        self.loss_fn = make_loss(model, family)
        self._value_and_grad = nn.value_and_grad(model, self.loss_fn)

    def loss_and_grad(self, model, rows):
        inputs, targets, idx, _, _ = collate(rows)
        return self._value_and_grad(model, inputs, targets, idx)

    def loss(self, model, rows):
        """(loss, supervised tokens); no loss for a batch with nothing supervised."""
        inputs, targets, idx, _, n_sup = collate(rows)
        return (self.loss_fn(model, inputs, targets, idx) if n_sup else None), n_sup


class SharedPrefixForward:
    """The shared prefix (or a group of rows per prefix) where a batch has one, else plain rows."""

    def __init__(self, shared: SharedPrefixLoss, plain: PlainForward):
        self.shared, self.plain = shared, plain

    def loss_and_grad(self, model, rows):
        groups = self.shared.groups(rows)
        if not groups:
            return self.plain.loss_and_grad(model, rows)
        loss, grads, _, _ = self.shared.loss_and_grad(model, rows, groups)
        return loss, grads

    def loss(self, model, rows):
        groups = self.shared.groups(rows)
        return self.shared.loss(model, rows, groups) if groups else self.plain.loss(model, rows)


class BlockwiseForward:
    """Checkpointed padded rows, the backward one block at a time (fast/blockwise.py); validation
    (no gradients) through the plain forward."""

    def __init__(self, blockwise: BlockwiseLoss, plain: PlainForward):
        self.blockwise, self.plain = blockwise, plain

    def loss_and_grad(self, model, rows):
        inputs, targets, idx, _, _ = collate(rows)
        return self.blockwise.loss_and_grad(model, inputs, targets, idx)

    def loss(self, model, rows):
        return self.plain.loss(model, rows)


class PackedForward:
    """Rows end to end in bins (with the shared prefix split off where it applies)."""

    def __init__(self, packed: PackedLoss):
        self.packed = packed

    def loss_and_grad(self, model, rows):
        loss, grads, _, _ = self.packed.loss_and_grad(model, rows)
        return loss, grads

    def loss(self, model, rows):
        return self.packed.loss(model, rows)


def choose_forward(model: nn.Module, recipe: Recipe, paths: SpeedPaths):
    """The forward a run trains through, decided once from its speed paths."""
    shared = SharedPrefixLoss(model, lm_head) if paths.shared_prefix else None
    if paths.packing:
        return PackedForward(PackedLoss(model, lm_head, recipe.train.max_seq_length, shared=shared))
    plain = PlainForward(model, recipe.model.family)
    if paths.blockwise:
        return BlockwiseForward(BlockwiseLoss(model, lm_head), plain)
    return SharedPrefixForward(shared, plain) if shared is not None else plain


class SFT(Objective):
    """Next-token loss on the assistant turns of chat rows."""

    def __init__(self, recipe: Recipe, train_set: list[Encoded], valid_set: list[Encoded]):
        self.recipe, self.train_set, self.valid_set = recipe, train_set, valid_set
        self.batches = self.forward = None  # set by attach: both depend on the speed paths

    @classmethod
    def from_data(cls, recipe: Recipe, data: TrainingData) -> "SFT":
        t, system = recipe.train, recipe.data.system_prompt
        train_set = data.encoded("train", system, t.max_seq_length)
        valid_set = data.encoded("valid", system, t.max_seq_length)
        if len(train_set) < t.batch_size:
            raise DataError(f"{data.path}/train.jsonl has {len(train_set)} rows, fewer than batch_size={t.batch_size}")
        return cls(recipe, train_set, valid_set)

    def attach(self, model, paths):
        # Grouped batches (train.group_by_prompt) only with the shared-prefix forward.
        self.batches = EpochBatches(self.train_set, self.recipe.train, grouped=paths.grouped_batches)
        self.forward = choose_forward(model, self.recipe, paths)

    def weights(self, items):
        return [int(r.mask[1:].sum()) for r in items]

    def counts(self, items):
        return sum(len(r.ids) - 1 for r in items), sum(int(r.mask[1:].sum()) for r in items)

    def loss_and_grad(self, model, items, batch):
        loss, grads = self.forward.loss_and_grad(model, items)
        return loss, grads, {}

    def validation_sums(self, model, items, batch_size):
        """Token-weighted loss sum over `items` (batches with nothing supervised add nothing)."""
        total, count = 0.0, 0
        for i in range(0, len(items), batch_size):
            loss, n_sup = self.forward.loss(model, items[i : i + batch_size])
            if n_sup == 0:
                continue
            mx.eval(loss)
            total += loss.item() * n_sup
            count += n_sup
        return {"loss": total}, count

    def describe_data(self):
        return {"rows": {"train": len(self.train_set), "valid": len(self.valid_set)},
                "supervised_tokens": {"train": int(sum(e.mask.sum() for e in self.train_set))}}
