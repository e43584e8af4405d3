"""Which speed and memory paths a run takes, decided once at set-up.

The training loop never asks "is the shared prefix on?": the SFT objective builds its forward
from `SpeedPaths` once, and `applied()` patches the model's modules for the run. The memory plan
and the benchmarks call `speed_paths` too, so all three agree on what a recipe runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.trainer import grad_checkpoint

from mlxft.config import Recipe
from mlxft.models import families
from mlxft.training.fast.allocator import freed_memory_kept, holds_freed_memory
from mlxft.training.fast.blockwise import supports_blockwise
from mlxft.training.fast.fastmath import fast_activations
from mlxft.training.fast.packing import supports_packing
from mlxft.training.fast.prefix import supports_shared_prefix


@dataclass(frozen=True)
class SpeedPaths:
    # The prompt every row shares runs once per batch (prefix.py). Not with checkpointing: its
    # forward drives the blocks itself, and so does checkpointing by blocks (blockwise.py) on padded rows.
    shared_prefix: bool
    # Rows end to end in bins (packing.py). Not with checkpointing (as above; under mlx-lm's, a block
    # recomputes after the forward, when the per-token rope is no longer in place).
    packing: bool
    # Every batch drawn from one prefix group (train.group_by_prompt), so the shared prefix always applies.
    grouped_batches: bool
    grad_checkpoint: bool
    # Checkpointing by blocks (blockwise.py: the backward one block at a time, so one block's
    # recomputed activations are alive at a time); where it does not apply, mlx-lm's checkpointing.
    blockwise: bool
    fast_activations: bool  # train.fast_silu: the fast SiLU and fused softmaxes (CPU backend only)
    # glibc keeps freed blocks for reuse instead of faulting fresh zeroed pages (allocator.py; CPU backend).
    keep_freed_memory: bool = False

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Patch the model's modules for the run (checkpointed blocks, fast activations) and set the
        allocator; restored after."""
        with _grad_checkpointing(model, self.grad_checkpoint and not self.blockwise), \
                fast_activations(self.fast_activations), freed_memory_kept(self.keep_freed_memory):
            yield


def speed_paths(recipe: Recipe, model: nn.Module | None = None) -> SpeedPaths:
    """The paths `recipe` trains with: from the family table alone, or checked on `model` itself
    (its blocks must be drivable one by one) when given."""
    t, family = recipe.train, recipe.model.family
    shared = t.shared_prefix and not t.grad_checkpoint and family in families.SHARED_PREFIX
    packing = t.packing and not t.grad_checkpoint and family in families.PACKING
    # SFT only: the preference objectives run their own forward under mlx-lm's checkpointing.
    blockwise = t.grad_checkpoint and t.method == "sft" and family in families.SHARED_PREFIX and family in families.SPARSE_HEAD
    if model is not None:
        shared = shared and supports_shared_prefix(model, family)
        packing = packing and supports_packing(model, family)
        blockwise = blockwise and supports_blockwise(model, family)
    return SpeedPaths(shared_prefix=shared, packing=packing, grouped_batches=shared and t.group_by_prompt,
                      grad_checkpoint=t.grad_checkpoint, blockwise=blockwise, fast_activations=t.fast_silu,
                      keep_freed_memory=t.keep_freed_memory and mx.default_device().type == mx.DeviceType.cpu
                      and holds_freed_memory())


@contextlib.contextmanager
def _grad_checkpointing(model: nn.Module, enabled: bool):
    """Recompute block activations in the backward pass, for this run only.

    mlx-lm's grad_checkpoint patches the block *class*, so without the restore every later
    model of that family in the process (tests, notebooks) would silently train checkpointed,
    and with dropout that changes the loss curve.
    """
    if not enabled:
        yield
        return
    block = type(model.layers[0])
    original = block.__call__
    grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        block.__call__ = original
