"""The contract between the training loop and a training method.

The loop (mlxft/training/loop.py) owns everything every method shares: micro-batches and
gradient accumulation, data parallelism, clipping, the NaN guard, metrics, validation, the best
adapter, early stopping, the overfitting alarm, Ctrl-C, checkpoints and the final save. A method
supplies an `Objective`: its data, its loss and gradients, its validation statistics, and how it
describes them. SFT (sft.py) and DPO/ORPO (preference.py) are objectives; a new method is a new
objective registered in setup.py, and the loop does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxft.config import Recipe
from mlxft.runs.run import RunDir
from mlxft.training.batches import EpochBatches
from mlxft.training.fast.paths import SpeedPaths


class Objective:
    """Base class: what a training method gives the loop. Subclasses set the attributes and
    override `attach`, `loss_and_grad` and `validation_sums`; the rest has working defaults."""

    name: str = "train"  # progress-bar label; "dpo" etc. also label the done message
    unit: str = "rows"  # what one training item is called in messages ("rows", "pairs")
    # Per-step statistics besides the loss (averaged into metrics.jsonl, logged as val_<key> after
    # validation): key -> (progress-bar label, format).
    stats: dict[str, tuple[str, str]] = {}
    train_set: list
    valid_set: list
    batches: EpochBatches  # built by the objective: how its items are drawn into micro-batches

    def before_adapters(self, model: nn.Module, log: Callable) -> None:
        """Work on the bare base before adapters exist (DPO: the reference log-probs). Default: none."""

    def attach(self, model: nn.Module, paths: SpeedPaths) -> None:
        """Build the loss (and choose its forward path) once, on the model with adapters attached."""
        raise NotImplementedError

    def weights(self, items: list) -> list[float]:
        """Each item's weight in the batch loss (SFT: its supervised tokens), for splitting a batch
        across data-parallel ranks so N ranks take the step one process would."""
        return [1.0] * len(items)

    def counts(self, items: list) -> tuple[int, int]:
        """(tokens, supervised tokens) a micro-batch trains on, for throughput figures."""
        raise NotImplementedError

    def loss_and_grad(self, model: nn.Module, items: list, batch: list) -> tuple[mx.array, dict, dict[str, mx.array]]:
        """(mean loss, gradients, statistics) of `items`: the micro-batch `batch`, or on one of several
        data-parallel ranks this rank's slice of it (for a loss whose normalisation spans the batch)."""
        raise NotImplementedError

    def validation_sums(self, model: nn.Module, items: list, batch_size: int) -> tuple[dict[str, float], float]:
        """Weighted sums of "loss" (and statistics) over validation `items`, and their total weight:
        the loop divides, after adding up the ranks' shares."""
        raise NotImplementedError

    def describe(self, stats: dict[str, float], prefix: str = "") -> str:
        """`stats` for a log line (", validation preference accuracy 0.75, ..."); empty by default."""
        return ""

    def describe_data(self) -> dict:
        """config.json's data.rows and data.supervised_tokens."""
        raise NotImplementedError

    def config_sections(self) -> dict:
        """Extra config.json sections of the method (DPO: its settings and reference). Default: none."""
        return {}


@dataclass
class Session:
    """What one training run works with, built by setup.py (fresh start or resume), driven by loop.fit."""

    recipe: Recipe
    run: RunDir
    config: dict  # config.json as written; updated with best/result as the run goes
    adapter_cfg: dict
    model: nn.Module
    optimizer: optim.Optimizer
    steps: int
    paths: SpeedPaths
    log: Callable
