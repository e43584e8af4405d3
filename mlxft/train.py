"""Train a LoRA / DoRA / full fine-tune with mlx-lm's layers and our own loop.

Run it as `mlxft train RECIPE [--data DIR] [--tier N] [--set k=v ...]`.

We reuse mlx-lm for model loading, LoRA/DoRA layers and schedules, and write the
loop ourselves because we need what mlx-lm's trainer lacks: loss on every
assistant turn (its mask covers one prompt prefix only), logits computed only
where there is a loss (the lm-head over a 49k vocabulary is ~20% of a small
model's step), length-bucketed batches, and run folders with metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import mlxft
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlxft.config import Recipe
from mlxft.data import Encoded, encode_rows, load_splits
from mlxft.errors import ConfigError, DataError
from mlxft.models import BaseModel, load_base
from mlxft.runs import RunDir, write_atomic

# Families whose Model is `lm_head(model(inputs))` (or tied embeddings) with nothing
# in between, so hidden states can be gathered at supervised positions before the head.
_SPARSE_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3"}


@dataclass
class TrainResult:
    run: RunDir
    steps: int
    final_train_loss: float
    final_val_loss: float | None
    seconds: float
    supervised_tokens_per_sec: float
    tokens_per_sec: float
    peak_memory_gb: float


# ---------------------------------------------------------------- model set-up


def attach_adapters(model: nn.Module, recipe: Recipe) -> None:
    """Freeze the base and make the recipe's layers trainable (LoRA/DoRA/full)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

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


def adapter_config(recipe: Recipe, n_layers: int, base: BaseModel) -> dict:
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
        "base_model": str(base.path),
        "system_prompt": recipe.data.system_prompt,
        "chat_template": base.tokenizer.chat_template,
        "recipe": recipe.name,
    }


def save_adapters(model: nn.Module, out_dir: Path, config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = out_dir / f".adapters-{os.getpid()}.safetensors"
    mx.save_safetensors(str(tmp), weights)
    os.replace(tmp, out_dir / "adapters.safetensors")
    write_atomic(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- batches and loss


def batch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows (little padding), deterministic per (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    window = batch_size * 16  # sort within windows: keeps randomness, cuts padding
    batches = []
    for w in range(0, len(perm), window):
        chunk = perm[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # equal batch sizes: steady step cost
    return [batches[i] for i in rng.permutation(len(batches))]


def collate(rows: list[Encoded]):
    """Right-pad to the longest row; return inputs, targets and flat supervised positions."""
    T = max(len(r.ids) for r in rows) - 1
    inputs = np.zeros((len(rows), T), dtype=np.int32)
    targets = np.zeros((len(rows), T), dtype=np.int32)
    mask = np.zeros((len(rows), T), dtype=bool)
    for i, r in enumerate(rows):
        n = len(r.ids) - 1
        inputs[i, :n] = r.ids[:-1]
        targets[i, :n] = r.ids[1:]
        mask[i, :n] = r.mask[1:]
    idx = np.flatnonzero(mask).astype(np.int32)
    n_tokens = sum(len(r.ids) - 1 for r in rows)
    return mx.array(inputs), mx.array(targets), mx.array(idx), n_tokens, len(idx)


def make_loss(model: nn.Module, family: str):
    """Mean cross-entropy over supervised positions; the head runs only at those positions."""
    sparse = family in _SPARSE_HEAD_FAMILIES and hasattr(model, "model")

    def head(h):
        if getattr(model, "lm_head", None) is not None and not getattr(model.args, "tie_word_embeddings", False):
            return model.lm_head(h)
        return model.model.embed_tokens.as_linear(h)

    def loss_fn(model, inputs, targets, idx):
        if sparse:
            h = model.model(inputs)
            h = h.reshape(-1, h.shape[-1])[idx]
            logits = head(h)
        else:
            logits = model(inputs)
            logits = logits.reshape(-1, logits.shape[-1])[idx]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets.reshape(-1)[idx])
        return ce.sum() / max(int(idx.size), 1)

    return loss_fn


def validation_loss(model, loss_fn, rows: list[Encoded], batch_size: int, max_batches: int) -> float:
    """Token-weighted mean loss on a fixed subset of the validation split."""
    total, count = 0.0, 0
    n = len(rows) if max_batches < 0 else min(len(rows), batch_size * max_batches)
    for i in range(0, n, batch_size):
        inputs, targets, idx, _, n_sup = collate(rows[i : i + batch_size])
        if n_sup == 0:
            continue
        loss = loss_fn(model, inputs, targets, idx)
        mx.eval(loss)
        total += loss.item() * n_sup
        count += n_sup
    return total / max(count, 1)


def build_schedule(recipe: Recipe, total_steps: int):
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
    t = recipe.train
    if t.iters:
        return t.iters
    if t.epochs:
        per_epoch = max(n_train // (t.batch_size * t.grad_accumulation), 1)
        return max(math.ceil(t.epochs * per_epoch), 1)
    raise ConfigError("set train.iters or train.epochs in the recipe")


# ---------------------------------------------------------------- run card


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "mlxft": mlxft.__version__}
    for name in ("mlx", "mlx-lm", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- the loop


def resolve_data_dir(path: str | Path) -> Path:
    """A relative data path is tried from the working directory, then from the mlxft checkout."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    from mlxft.recipes import RECIPES_DIR

    alt = RECIPES_DIR.parent / p
    return alt if alt.exists() else p


def train(recipe: Recipe, data_dir: str | Path | None = None, runs_root: Path | None = None, log=print) -> TrainResult:
    """Fine-tune the recipe's base model on `data_dir` and write a run folder."""
    data_dir = resolve_data_dir(data_dir or recipe.data.path)
    splits = load_splits(data_dir, ("train", "valid"))
    base = load_base(recipe.model.source, recipe.quantize)
    log(f"base model: {base.path} [{base.precision}]")
    log(base.note)
    if base.default_template:
        log("the base model has no chat template: using mlxft's default ChatML template (recorded in the run)")
    model, tokenizer = base.model, base.tokenizer
    t = recipe.train
    system = recipe.data.system_prompt
    train_set = encode_rows(tokenizer, splits["train"], system, t.max_seq_length)
    valid_set = encode_rows(tokenizer, splits["valid"], system, t.max_seq_length)
    if len(train_set) < t.batch_size:
        raise DataError(f"{data_dir}/train.jsonl has {len(train_set)} rows, fewer than batch_size={t.batch_size}")

    mx.random.seed(t.seed)
    np.random.seed(t.seed)
    attach_adapters(model, recipe)
    if t.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    model.train()
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))

    steps = total_steps(recipe, len(train_set))
    optimizer = optim.AdamW(learning_rate=build_schedule(recipe, steps), weight_decay=t.weight_decay)
    loss_fn = make_loss(model, recipe.model.family)
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    run = RunDir.create(recipe.name, runs_root)
    config = {
        "recipe": dataclasses.asdict(recipe),
        "data": {
            "path": str(data_dir.resolve()),
            "sha256": {s: _sha256(data_dir / f"{s}.jsonl") for s in ("train", "valid")},
            "rows": {"train": len(train_set), "valid": len(valid_set)},
            "supervised_tokens": {"train": int(sum(e.mask.sum() for e in train_set))},
        },
        "base_model": {"source": recipe.model.source, "path": str(base.path), "precision": base.precision, "note": base.note},
        "chat_template": tokenizer.chat_template,
        "default_chat_template": base.default_template,
        "system_prompt": system,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "steps": steps,
        "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "device": str(mx.default_device())},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    run.write_config(config)
    adapter_cfg = adapter_config(recipe, len(model.layers), base)
    log(f"run folder: {run.root}")
    log(
        f"training {n_trainable / 1e6:.2f}M of {n_total / 1e6:.1f}M parameters ({recipe.fine_tune_type}), "
        f"{len(train_set)} train / {len(valid_set)} valid rows, {steps} steps of batch {t.batch_size}x{t.grad_accumulation}"
    )

    from tqdm import tqdm

    lengths = np.array([len(e.ids) for e in train_set])
    order: list[np.ndarray] = []
    epoch = 0
    mx.reset_peak_memory()
    tokens = sup_tokens = 0
    window_loss = window_n = 0.0
    train_time = 0.0
    val_loss = None
    last_loss = float("nan")
    bar = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    state = [model.state, optimizer.state]
    try:
        for step in range(1, steps + 1):
            tic = time.perf_counter()
            grads_acc = None
            step_loss = 0.0
            for _ in range(t.grad_accumulation):
                if not order:
                    order = batch_order(lengths, t.batch_size, t.seed, epoch)
                    epoch += 1
                batch = [train_set[i] for i in order.pop(0)]
                inputs, targets, idx, n_tok, n_sup = collate(batch)
                loss, grads = loss_and_grad(model, inputs, targets, idx)
                grads_acc = grads if grads_acc is None else _tree_add(grads_acc, grads)
                step_loss += loss
                tokens += n_tok
                sup_tokens += n_sup
            if t.grad_accumulation > 1:
                grads_acc = _tree_scale(grads_acc, 1.0 / t.grad_accumulation)
                step_loss = step_loss / t.grad_accumulation
            if t.max_grad_norm:
                grads_acc, _ = optim.clip_grad_norm(grads_acc, t.max_grad_norm)
            optimizer.update(model, grads_acc)
            mx.eval(state, step_loss)
            train_time += time.perf_counter() - tic
            last_loss = step_loss.item()
            if not math.isfinite(last_loss):
                raise DataError(
                    f"loss became {last_loss} at step {step}: lower train.learning_rate (now {t.learning_rate}) "
                    "or check the data for empty or extremely long rows"
                )
            window_loss += last_loss
            window_n += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens / train_time:.0f}", val=f"{val_loss:.3f}" if val_loss else "-")
            if step % t.report_every == 0 or step == steps:
                run.log_metrics(
                    {
                        "step": step,
                        "train_loss": window_loss / window_n,
                        "learning_rate": float(optimizer.learning_rate.item()),
                        "tokens": tokens,
                        "supervised_tokens": sup_tokens,
                        "tokens_per_sec": tokens / train_time,
                        "supervised_tokens_per_sec": sup_tokens / train_time,
                        "peak_memory_gb": mx.get_peak_memory() / 1e9,
                        "elapsed_sec": train_time,
                    }
                )
                window_loss = window_n = 0
            if valid_set and (step % t.val_every == 0 or step == steps):
                model.eval()
                val_loss = validation_loss(model, loss_fn, valid_set, t.batch_size, t.val_batches)
                model.train()
                run.log_metrics({"step": step, "val_loss": val_loss})
                bar.write(f"step {step}: train loss {last_loss:.3f}, validation loss {val_loss:.3f}")
    except KeyboardInterrupt:
        bar.close()
        save_adapters(model, run.adapters, adapter_cfg)
        log(f"\ninterrupted: adapters so far saved in {run.adapters}")
        raise
    bar.close()
    save_adapters(model, run.adapters, adapter_cfg)
    result = TrainResult(
        run=run,
        steps=steps,
        final_train_loss=last_loss,
        final_val_loss=val_loss,
        seconds=train_time,
        supervised_tokens_per_sec=sup_tokens / train_time,
        tokens_per_sec=tokens / train_time,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    config["result"] = {k: v for k, v in result.__dict__.items() if k != "run"}
    config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    run.write_config(config)
    log(
        f"done: {steps} steps in {train_time:.0f}s, {result.tokens_per_sec:.0f} tokens/s "
        f"({result.supervised_tokens_per_sec:.1f} supervised/s), peak memory {result.peak_memory_gb:.2f} GB; "
        f"adapters in {run.adapters}"
    )
    return result


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * s, a)
