"""What training changes in the base: LoRA / DoRA layers (or unfrozen blocks), their
adapter_config.json, and the learning-rate schedule. mlx-lm's own layers and schedules, reused."""

from __future__ import annotations

import math

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx_lm.tuner.utils import linear_to_lora_layers

from mlxft.config import Recipe
from mlxft.errors import ConfigError


def attach_adapters(model: nn.Module, recipe: Recipe) -> None:
    """Freeze the base and make the recipe's layers trainable (LoRA/DoRA/full); mutates `model`."""
    n_layers = len(model.layers)
    num = recipe.lora.num_layers
    if num == -1:
        num = n_layers
    if not 0 < num <= n_layers:
        raise ConfigError(f"lora.num_layers={recipe.lora.num_layers} but the model has {n_layers} layers")
    model.freeze()
    if recipe.fine_tune_type == "full":
        for layer in model.layers[-num:]:
            layer.unfreeze()
        return
    linear_to_lora_layers(
        model,
        num,
        {"rank": recipe.lora.rank, "scale": recipe.lora.scale, "dropout": recipe.lora.dropout, "keys": recipe.lora.targets},
        use_dora=recipe.fine_tune_type == "dora",
    )


def adapter_config(recipe: Recipe, n_layers: int, base_path, chat_template: str | None) -> dict:
    """adapter_config.json in mlx-lm's format (stock mlx_lm.generate loads it) plus our parity fields."""
    num = n_layers if recipe.lora.num_layers == -1 else recipe.lora.num_layers
    return {
        "fine_tune_type": recipe.fine_tune_type,
        "num_layers": num,
        "lora_parameters": {
            "rank": recipe.lora.rank,
            "scale": recipe.lora.scale,
            "dropout": recipe.lora.dropout,
            "keys": list(recipe.lora.targets),
        },
        "base_model": str(base_path),
        "system_prompt": recipe.data.system_prompt,
        "chat_template": chat_template,
        "recipe": recipe.name,
    }


def build_schedule(recipe: Recipe, total_steps: int):
    """Linear warm-up from a tenth of the learning rate, then the recipe's decay to a tenth."""
    t = recipe.train
    warm = min(t.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warm, 1)
    if t.lr_schedule == "cosine":
        main = optim.cosine_decay(t.learning_rate, decay_steps, end=t.learning_rate * 0.1)
    elif t.lr_schedule == "linear":
        main = optim.linear_schedule(t.learning_rate, t.learning_rate * 0.1, decay_steps)
    else:
        main = lambda step: mx.array(t.learning_rate)  # noqa: E731
    if warm == 0:
        return main
    return optim.join_schedules([optim.linear_schedule(t.learning_rate * 0.1, t.learning_rate, warm), main], [warm])


def total_steps(recipe: Recipe, n_train: int) -> int:
    """Optimizer steps of the run: train.iters, or train.epochs over `n_train` items."""
    t = recipe.train
    if t.iters:
        return t.iters
    if t.epochs:
        per_epoch = max(n_train // (t.batch_size * t.grad_accumulation), 1)
        return max(math.ceil(t.epochs * per_epoch), 1)
    raise ConfigError("set train.iters or train.epochs in the recipe")
