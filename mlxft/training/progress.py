"""Where a training run stands: everything besides tensors that the loop needs to continue exactly.

A checkpoint stores it as state.json (mlxft/training/checkpoint.py); `mlxft train --resume`
reads it back, so a resumed run continues with the same data position, counters and alarms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    # The batch order is deterministic per (seed, epoch), so (epoch, position) pins the data order.
    epoch: int = 0
    position: int = 0  # index of the next micro-batch in this epoch's batch list
    tokens: int = 0
    supervised_tokens: int = 0
    train_seconds: float = 0.0
    window_loss: float = 0.0  # sum of step losses since the last metrics line
    window_n: int = 0
    # The objective's per-step statistics (e.g. DPO's reward margin): sums since the last metrics
    # line, and the last step's values (the progress bar, the run's result).
    window_stats: dict = field(default_factory=dict)
    last_stats: dict = field(default_factory=dict)
    since_val_loss: float = 0.0  # sum of step losses since the last validation (overfitting alarm)
    since_val_n: int = 0
    last_loss: float = math.nan
    val_loss: float | None = None
    best_val_loss: float | None = None  # the adapter in RUN/adapters/best has this loss
    best_step: int | None = None
    patience_ref: float | None = None  # the loss a validation must beat by min_delta to count as progress
    bad_evals: int = 0  # validations in a row without such progress
    # [validation loss, mean train loss since the previous validation] per validation.
    history: list[list[float]] = field(default_factory=list)
    stop_reason: str | None = None  # "done" or "early stopping" once the run has ended
    rng: dict = field(default_factory=dict)  # mx.random key and numpy's global state at the step
