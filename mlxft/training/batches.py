"""The order training draws its micro-batches in: shuffled, length-bucketed, deterministic.

An epoch's batches depend only on (seed, epoch) and the items' lengths, so a checkpoint pins
the data position with two numbers (Progress.epoch, Progress.position) and a resumed run, a
data-parallel rank, the memory plan and the benchmarks all see the very same batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from mlxft.config import TrainConfig

# Rows whose first PREFIX_KEY ids agree belong to one prefix group (the chat template's system
# turn opens every row, so one system prompt = one group; two prompts differ within 16 ids).
PREFIX_KEY = 16


def batch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Shuffled batches of similar-length items (little padding), deterministic per (seed, epoch).

    `groups` (optional, one id per item): every batch is drawn from one group (`prefix_groups`:
    rows under one system prompt, whose shared prefix then runs once per batch); the batches of
    all groups are shuffled together. One group gives the plain order.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    streams = [perm] if groups is None else [perm[groups[perm] == g] for g in np.unique(groups)]
    window = batch_size * 16  # sort within windows: keeps randomness, cuts padding
    batches = []
    for stream in streams:
        for w in range(0, len(stream), window):
            chunk = stream[w : w + window]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    # Equal batch sizes (steady step cost): each stream's last partial batch waits for another epoch.
    batches = [b for b in batches if len(b) == batch_size]
    return [batches[i] for i in rng.permutation(len(batches))]


def prefix_groups(rows: Sequence, batch_size: int) -> np.ndarray:
    """A group id per encoded row for `batch_order`: rows that start alike (one system prompt) share an id.

    On the default data (two system prompts, 13% replay rows) 65 of 129 mixed batches hold both
    prompts (they run a shared prefix per group of rows, prefix.batch_groups); grouped, none
    does. Used with `train.group_by_prompt` (off by default: see config.py).
    Groups smaller than a batch are pooled into one (-1) so their rows still bucket by length.
    """
    keys = [bytes(np.asarray(r.ids[:PREFIX_KEY], dtype=np.int32)) for r in rows]
    counts: dict[bytes, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    ids = {k: i for i, k in enumerate(sorted(counts))}  # sorted keys: the same ids in every process
    return np.array([ids[k] if counts[k] >= batch_size else -1 for k in keys])


def row_length(row) -> int:
    """An encoded row's length: what SFT batches bucket by."""
    return len(row.ids)


class EpochBatches:
    """The micro-batches of a run, epoch after epoch: `next(progress)` is the batch at
    (progress.epoch, progress.position), and advances the position.

    `grouped`: draw every batch from one prefix group (train.group_by_prompt with the shared-prefix
    forward; items are then encoded rows). `length`: what to bucket items by.
    """

    def __init__(self, items: Sequence, train: TrainConfig, grouped: bool = False,
                 length: Callable = row_length):
        self.items = items
        self.batch_size, self.seed = train.batch_size, train.seed
        self.lengths = np.array([length(item) for item in items])
        self.groups = prefix_groups(items, train.batch_size) if grouped else None
        self._epoch, self._order = -1, []

    def order(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s batches as item indices."""
        if epoch != self._epoch:
            self._order = batch_order(self.lengths, self.batch_size, self.seed, epoch, self.groups)
            self._epoch = epoch
        return self._order

    def next(self, progress) -> list:
        """The micro-batch at the progress's data position; moves the position on (mutates `progress`)."""
        order = self.order(progress.epoch)
        batch = [self.items[i] for i in order[progress.position]]
        progress.position += 1
        if progress.position == len(order):
            progress.epoch, progress.position = progress.epoch + 1, 0
        return batch

    def first(self, n: int) -> list[int]:
        """Indices of the items the first `n` micro-batches use, sorted (DPO computes reference
        log-probs only for those when a run is shorter than an epoch)."""
        needed: set[int] = set()
        epoch = 0
        while n > 0 and len(needed) < len(self.items):
            order = self.order(epoch)
            for batch in order[:n]:
                needed.update(batch.tolist())
            n, epoch = n - len(order), epoch + 1
        return sorted(needed)
