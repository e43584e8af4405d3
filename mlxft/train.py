"""Train a LoRA / DoRA / full fine-tune with mlx-lm's layers and our own loop.

Run it as `mlxft train RECIPE [--data DIR] [--tier N] [--set k=v ...]`,
or continue a stopped run with `mlxft train --resume RUN`.

We reuse mlx-lm for model loading, LoRA/DoRA layers and schedules, and write the
loop ourselves because we need what mlx-lm's trainer lacks: loss on every
assistant turn (its mask covers one prompt prefix only), logits computed only
where there is a loss (the lm-head over a 49k vocabulary is ~20% of a small
model's step), length-bucketed batches, run folders with metrics, and
full-state checkpoints that resume bit-identically (see mlxft/checkpoint.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import mlxft
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlxft.checkpoint import (
    Progress, describe_skipped, latest_checkpoint, newest_complete_checkpoint, read_progress, save_adapters,
    save_checkpoint, truncate_metrics,
)
from mlxft.config import DataConfig, EvalConfig, LoraConfig, ModelConfig, Recipe, TierConfig, TrainConfig
from mlxft.config import PreferenceConfig
from mlxft.data import Encoded, encode_rows, load_splits, pad_rows
from mlxft.run_format import check_resumable, version_note
from mlxft import distributed as dist
from mlxft.errors import ConfigError, DataError, MlxftError
from mlxft.models import BaseModel, load_base
from mlxft.packing import PackedLoss, supports_packing
from mlxft.fastmath import fast_activations
from mlxft.loss import supervised_loss
from mlxft.prefix import SharedPrefixLoss, supports_shared_prefix
from mlxft.runs import RunDir

# Families whose Model is `lm_head(model(inputs))` (or tied embeddings) with nothing
# in between, so hidden states can be gathered at supervised positions before the head.
_SPARSE_HEAD_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3_text"}

# Validations in a row with rising validation loss (while train loss falls) before the
# overfitting alarm: one or two rises are often noise on a small validation subset.
OVERFIT_RISES = 3


class TrainingDiverged(MlxftError):
    """The loss or the gradients became NaN/inf; the run stopped before saving that state."""


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
    best_val_loss: float | None = None
    best_step: int | None = None
    stopped_early: bool = False


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


# ---------------------------------------------------------------- batches and loss


def batch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int, groups: np.ndarray | None = None) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows (little padding), deterministic per (seed, epoch).

    `groups` (optional, one id per row): every batch is drawn from one group (`prefix_groups`:
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


# Rows whose first PREFIX_KEY ids agree belong to one prefix group (the chat template's system
# turn opens every row, so one system prompt = one group; two prompts differ within 16 ids).
PREFIX_KEY = 16


def prefix_groups(rows: list[Encoded], batch_size: int) -> np.ndarray:
    """A group id per row for `batch_order`: rows that start alike (one system prompt) share an id.

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


def epoch_order(rows: list, t: TrainConfig, epoch: int, shared: bool, length=lambda e: len(e.ids)) -> list[np.ndarray]:
    """Epoch `epoch`'s batches (row indices) as training draws them. `shared`: the shared-prefix
    forward is in use; then train.group_by_prompt draws each batch from one prefix group, so the
    shared prefix always applies."""
    grouped = shared and getattr(t, "group_by_prompt", False)
    groups = prefix_groups(rows, t.batch_size) if grouped else None
    return batch_order(np.array([length(e) for e in rows]), t.batch_size, t.seed, epoch, groups)


def collate(rows: list[Encoded]):
    """Right-pad to the longest row; return inputs, targets and flat supervised positions."""
    inputs, targets, mask = pad_rows(rows)
    idx = np.flatnonzero(mask).astype(np.int32)
    n_tokens = sum(len(r.ids) - 1 for r in rows)
    return mx.array(inputs), mx.array(targets), mx.array(idx), n_tokens, len(idx)


def lm_head(model: nn.Module, h: mx.array) -> mx.array:
    """Logits from final hidden states (the output projection, or the tied embeddings)."""
    if getattr(model, "lm_head", None) is not None and not getattr(model.args, "tie_word_embeddings", False):
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def make_loss(model: nn.Module, family: str):
    """Mean cross-entropy over supervised positions; the head runs only at those positions."""
    sparse = family in _SPARSE_HEAD_FAMILIES and hasattr(model, "model")

    def loss_fn(model, inputs, targets, idx):
        if sparse:
            h = model.model(inputs)
            # The head only at supervised positions, chunked when its logits are big (mlxft/loss.py).
            return supervised_loss(model, lm_head, h.reshape(-1, h.shape[-1])[idx], targets.reshape(-1)[idx])
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[idx]
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets.reshape(-1)[idx])
        return ce.sum() / max(int(idx.size), 1)

    return loss_fn


def validation_loss(
    model, loss_fn, rows: list[Encoded], batch_size: int, max_batches: int, shared=None, packed=None
) -> float:
    """Token-weighted mean loss on a fixed subset of the validation split (shared: a SharedPrefixLoss,
    packed: a PackedLoss, which takes the shared prefix itself where it applies)."""
    total, count = 0.0, 0
    n = len(rows) if max_batches < 0 else min(len(rows), batch_size * max_batches)
    for i in range(0, n, batch_size):
        batch = rows[i : i + batch_size]
        groups = shared.groups(batch) if shared is not None and packed is None else None
        if packed is not None:
            loss, n_sup = packed.loss(model, batch)
        elif groups:
            loss, n_sup = shared.loss(model, batch, groups)
        else:
            inputs, targets, idx, _, n_sup = collate(batch)
            loss = loss_fn(model, inputs, targets, idx) if n_sup else None
        if n_sup == 0:
            continue
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


def recipe_from_dict(data: dict) -> Recipe:
    """Rebuild the Recipe a run recorded in config.json, so a resumed run trains with exactly it."""

    def build(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    sections = {"model": ModelConfig, "lora": LoraConfig, "train": TrainConfig, "data": DataConfig, "eval": EvalConfig}
    sections["preference"] = PreferenceConfig  # DPO/ORPO settings (mlxft/preference.py)
    recipe = build(Recipe, {k: v for k, v in data.items() if k not in sections and k != "tiers"})
    for name, cls in sections.items():
        setattr(recipe, name, build(cls, data.get(name) or {}))
    # JSON turned the tier numbers into strings.
    recipe.tiers = {int(k): build(TierConfig, v) for k, v in (data.get("tiers") or {}).items()}
    return recipe


def check_train_settings(t: TrainConfig) -> None:
    """Settings the recipe loader does not range-check yet; all problems in one message."""
    problems = []
    if t.save_every < 0:
        problems.append(f"train.save_every={t.save_every}: expected 0 (only at the end) or a positive step count")
    if t.keep_checkpoints < 1:
        problems.append(f"train.keep_checkpoints={t.keep_checkpoints}: expected at least 1 (resume needs one)")
    if (t.early_stopping_patience or 0) < 0 or t.early_stopping_min_delta < 0:
        problems.append("train.early_stopping_patience and train.early_stopping_min_delta must not be negative")
    if t.val_every < 1 or t.report_every < 1:
        problems.append(f"train.val_every={t.val_every} and train.report_every={t.report_every} must be positive")
    if problems:
        raise ConfigError("; ".join(problems))


# ---------------------------------------------------------------- set-up


@dataclass
class Session:
    """What one training run works with: built by `_prepare`, driven by `_run`."""

    recipe: Recipe
    run: RunDir
    config: dict  # config.json as written; updated with best/result as the run goes
    adapter_cfg: dict
    model: nn.Module
    optimizer: optim.Optimizer
    loss_fn: Callable
    loss_and_grad: Callable
    train_set: list[Encoded]
    valid_set: list[Encoded]
    steps: int
    log: Callable
    order: list[np.ndarray] = dataclasses.field(default_factory=list)  # batch_order of `order_epoch`
    order_epoch: int = -1
    shared: SharedPrefixLoss | None = None  # the shared-prefix forward, where it applies (mlxft/prefix.py)
    packed: PackedLoss | None = None  # train.packing: rows end to end, no padding (mlxft/packing.py)


def check_data(recipe: Recipe, data_dir: Path, log) -> None:
    """Run `mlxft data check` before any weights load; refuse to train on errors."""
    from mlxft.data import load_tokenizer
    from mlxft.lint import check_path

    report = check_path(data_dir, recipe, load_tokenizer(recipe.model.source)[0], required_splits=("train", "valid"))
    if not report.ok:
        raise DataError(
            f"{report.errors[0]} ({len(report.errors)} error(s); nothing trained; see: mlxft data check {data_dir})"
        )
    if report.warnings:
        log(f"data check: {len(report.warnings)} warning(s); see: mlxft data check {data_dir}")


def _load(recipe: Recipe, data_dir: Path, log) -> tuple[BaseModel, list[Encoded], list[Encoded]]:
    """Base model and encoded train/valid rows."""
    splits = load_splits(data_dir, ("train", "valid"))
    base = load_base(recipe.model.source, recipe.quantize)
    log(f"base model: {base.path} [{base.precision}]")
    log(base.note)
    if base.default_template:
        log("the base model has no chat template: using mlxft's default ChatML template (recorded in the run)")
    t = recipe.train
    system = recipe.data.system_prompt
    train_set = encode_rows(base.tokenizer, splits["train"], system, t.max_seq_length)
    valid_set = encode_rows(base.tokenizer, splits["valid"], system, t.max_seq_length)
    if len(train_set) < t.batch_size:
        raise DataError(f"{data_dir}/train.jsonl has {len(train_set)} rows, fewer than batch_size={t.batch_size}")
    return base, train_set, valid_set


def _prepare(recipe: Recipe, base: BaseModel, train_set, valid_set, run: RunDir, config: dict, log) -> Session:
    """Seed, attach adapters and build the optimizer: the same on a fresh start and on resume."""
    t = recipe.train
    dist.check_batch_size(t.batch_size)
    mx.random.seed(t.seed)
    np.random.seed(t.seed)
    model = base.model
    attach_adapters(model, recipe)
    model.train()
    steps = total_steps(recipe, len(train_set))
    optimizer = optim.AdamW(learning_rate=build_schedule(recipe, steps), weight_decay=t.weight_decay)
    loss_fn = make_loss(model, recipe.model.family)
    # Checkpointed blocks recompute inside mx.checkpoint, so prefix keys/values could not leave them.
    shared = None
    if t.shared_prefix and not t.grad_checkpoint and supports_shared_prefix(model, recipe.model.family):
        shared = SharedPrefixLoss(model, lm_head)
    # Packed bins of at most max_seq_length tokens. Not with checkpointing: mx.checkpoint recomputes
    # a block after the forward, when the per-token rope (mlxft/packing.py) is no longer in place.
    packed = None
    if t.packing and not t.grad_checkpoint and supports_packing(model, recipe.model.family):
        packed = PackedLoss(model, lm_head, t.max_seq_length, shared=shared)
    elif t.packing:
        log(f"note: train.packing is off for this run (grad_checkpoint, or the {recipe.model.family} family); training unpacked")
    return Session(
        recipe, run, config, adapter_config(recipe, len(model.layers), base), model, optimizer,
        loss_fn, nn.value_and_grad(model, loss_fn), train_set, valid_set, steps, log, shared=shared, packed=packed,
    )


def _run_card(recipe: Recipe, base: BaseModel, data_dir: Path, train_set, valid_set, steps: int) -> dict:
    """config.json: the resolved recipe, data hashes, base model, library versions, machine."""
    n_trainable = sum(v.size for _, v in tree_flatten(base.model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(base.model.parameters()))
    return {
        "recipe": dataclasses.asdict(recipe),
        "data": {
            "path": str(data_dir.resolve()),
            "sha256": {s: _sha256(data_dir / f"{s}.jsonl") for s in ("train", "valid")},
            "rows": {"train": len(train_set), "valid": len(valid_set)},
            "supervised_tokens": {"train": int(sum(e.mask.sum() for e in train_set))},
        },
        "base_model": {"source": recipe.model.source, "path": str(base.path), "precision": base.precision, "note": base.note},
        "chat_template": base.tokenizer.chat_template,
        "chat_template_sha256": hashlib.sha256((base.tokenizer.chat_template or "").encode()).hexdigest(),
        "default_chat_template": base.default_template,
        "system_prompt": recipe.data.system_prompt,
        "trainable_parameters": n_trainable,
        "total_parameters": n_total,
        "steps": steps,
        "versions": versions(),
        "ranks": dist.size(),  # data-parallel ranks (mlx.launch); batch_size is the global batch
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "device": str(mx.default_device()),
                    **_machine_details()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _machine_details() -> dict:
    """CPU/chip, cores and RAM for the run card (the report's "machine" row)."""
    import os

    from mlxft.doctor import chip, memory_bytes

    return {"chip": chip(), "cpu_count": os.cpu_count(), "memory_gb": round(memory_bytes()[0] / 1e9, 1)}


# ---------------------------------------------------------------- entry points


def train(recipe: Recipe, data_dir: str | Path | None = None, runs_root: Path | None = None, log=print) -> TrainResult:
    """Fine-tune the recipe's base model on `data_dir` and write a run folder."""
    if recipe.train.method != "sft":  # DPO / ORPO: same pieces, a pair loss (mlxft/preference.py)
        from mlxft.preference import train_preference

        dist.single_process_only("DPO/ORPO training")
        return train_preference(recipe, data_dir, runs_root, log)
    check_train_settings(recipe.train)
    data_dir = resolve_data_dir(data_dir or recipe.data.path)
    check_data(recipe, data_dir, log)
    base, train_set, valid_set = _load(recipe, data_dir, log)
    run = dist.create_run(recipe.name, runs_root)  # rank 0 creates it; other ranks never write
    s = _prepare(recipe, base, train_set, valid_set, run, {}, log)
    s.config = _run_card(recipe, base, data_dir, train_set, valid_set, s.steps)
    dist.check_same_start(s.config, s.model)  # every rank: same data, base, versions and start weights
    run.write_config(s.config)
    t = recipe.train
    log(f"run folder: {run.root}")
    log(
        f"training {s.config['trainable_parameters'] / 1e6:.2f}M of {s.config['total_parameters'] / 1e6:.1f}M "
        f"parameters ({recipe.fine_tune_type}), {len(train_set)} train / {len(valid_set)} valid rows, "
        f"{s.steps} steps of batch {t.batch_size}x{t.grad_accumulation}"
    )
    return _run(s, Progress())


def resume(run_path: str | Path, log=print) -> TrainResult:
    """Continue RUN from its newest checkpoint with the recipe and data recorded in its config.json."""
    root, ckpt, config, notes = dist.on_main(_open_resumable, str(run_path))  # only rank 0 has the run folder
    for note in [*notes, version_note(config)]:  # a damaged newest checkpoint; a run from another mlxft version
        if note:
            log(note)
    if config.get("recipe", {}).get("train", {}).get("method", "sft") != "sft":
        from mlxft.preference import resume_preference

        dist.single_process_only("DPO/ORPO training")
        return resume_preference(run_path, log)
    run, ckpt = RunDir(Path(root)), Path(ckpt)
    dist.remember_run(run.root)
    recipe = recipe_from_dict(config["recipe"])
    data_dir = Path(config["data"]["path"])
    _check_same_data(data_dir, config["data"]["sha256"])
    base, train_set, valid_set = _load(recipe, data_dir, log)
    s = _prepare(recipe, base, train_set, valid_set, run, config, log)
    progress = dist.load_checkpoint(ckpt, s.model, s.optimizer)
    truncate_metrics(run, progress.step)
    run.log_metrics({"step": progress.step, "event": "resumed", "checkpoint": ckpt.name})
    config.setdefault("resumed", []).append({"from_step": progress.step, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    run.write_config(config)
    log(f"resuming {run.root} from {ckpt.name} (step {progress.step} of {s.steps})")
    if config.get("versions") != versions():  # other kernels: close to, but not bit-identical with, a straight run
        log(f"note: library versions differ from the run's start ({config.get('versions')} -> {versions()})")
    return _run(s, progress)


def _open_resumable(run_path: str) -> list:
    """[run folder, newest checkpoint, config.json] of a run that can be resumed (a non-SFT run: no checkpoint check)."""
    run = RunDir.open(run_path)
    config = run.read_config()
    check_resumable(config, run.config)
    if config.get("recipe", {}).get("train", {}).get("method", "sft") != "sft":
        return [str(run.root), None, config, []]
    ckpt, skipped = newest_complete_checkpoint(run)
    if ckpt is None:
        raise MlxftError(
            f"{run.root} has no checkpoint to resume from ({run.checkpoints} is empty or missing"
            + "".join(f"; {p.name} is damaged: {why}" for p, why in skipped)
            + "); checkpoints are written every train.save_every steps"
        )
    done = read_progress(ckpt)
    if done.stop_reason:
        raise MlxftError(f"{run.root} already finished ({done.stop_reason} at step {done.step}); nothing to resume")
    return [str(run.root), str(ckpt), config, describe_skipped(skipped, ckpt)]


def _check_same_data(data_dir: Path, recorded: dict) -> None:
    for split, digest in recorded.items():
        path = data_dir / f"{split}.jsonl"
        if not path.is_file() or _sha256(path) != digest:
            raise DataError(
                f"{path} is missing or changed since the run started; resuming would not continue the same run "
                "(start a new run instead)"
            )


# ---------------------------------------------------------------- the loop


def _run(s: Session, p: Progress) -> TrainResult:
    """Train from `p` to the end (or early stop), checkpointing; Ctrl-C checkpoints and re-raises."""
    from tqdm import tqdm

    t = s.recipe.train
    mx.reset_peak_memory()
    bar = tqdm(total=s.steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        with _grad_checkpointing(s.model, t.grad_checkpoint), fast_activations(t.fast_silu), \
                _deferred_sigint() as interrupted:
            while p.step < s.steps and not p.stop_reason:
                _train_step(s, p)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{p.last_loss:.3f}",
                    tok_s=f"{p.tokens / max(p.train_seconds, 1e-9):.0f}",
                    val=f"{p.val_loss:.3f}" if p.val_loss is not None else "-",
                )
                _after_step(s, p, bar.write)
                if p.step == s.steps or p.stop_reason:
                    break  # _finish writes the final checkpoint, even after a late Ctrl-C
                saved = bool(t.save_every) and p.step % t.save_every == 0
                if saved:
                    save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, t.keep_checkpoints)
                if dist.any_rank(interrupted.is_set()):  # every rank stops at the same step
                    _stop_interrupted(s, p, saved)
    finally:
        bar.close()
    return _finish(s, p)


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
    from mlx_lm.tuner.trainer import grad_checkpoint

    block = type(model.layers[0])
    original = block.__call__
    grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        block.__call__ = original


@contextlib.contextmanager
def _deferred_sigint():
    """First Ctrl-C: finish the current step, then checkpoint and stop. A second Ctrl-C stops at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_interrupted(s: Session, p: Progress, saved: bool) -> None:
    t = s.recipe.train
    if not saved:
        save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, t.keep_checkpoints)
    save_adapters(s.model, s.run.adapters, s.adapter_cfg)
    s.run.log_metrics({"step": p.step, "event": "interrupted"})  # `mlxft runs`: resumable, not still running
    s.log(
        f"\ninterrupted at step {p.step} of {s.steps}: checkpoint saved in {s.run.checkpoint(p.step)}\n"
        f"resume with: mlxft train --resume {s.run.root}" + (" (and the same --hosts/--hostfile)" if dist.size() > 1 else "")
    )
    dist.finish_interrupted()
    raise KeyboardInterrupt


def _next_batch(s: Session, p: Progress, length=lambda e: len(e.ids)) -> list:
    """The next micro-batch: position `p.position` of epoch `p.epoch`'s deterministic order
    (bucketed by `length` of each training item; the preference loop passes a pair's length)."""
    if s.order_epoch != p.epoch:
        s.order = epoch_order(s.train_set, s.recipe.train, p.epoch, getattr(s, "shared", None) is not None, length)
        s.order_epoch = p.epoch
    batch = [s.train_set[i] for i in s.order[p.position]]
    p.position += 1
    if p.position == len(s.order):
        p.epoch, p.position = p.epoch + 1, 0
    return batch


def _train_step(s: Session, p: Progress) -> None:
    """One optimizer step over grad_accumulation micro-batches; refuses to apply a non-finite update."""
    t = s.recipe.train
    tic = time.perf_counter()
    grads_acc, step_loss = None, 0.0
    with dist.rank_rng():
        for _ in range(t.grad_accumulation):
            # With several ranks: this rank's slice of the global batch, weighted by its token share.
            rows, weight, n_tok, n_sup = dist.shard_batch(_next_batch(s, p))
            loss, grads = _loss_and_grad(s, rows)
            if weight != 1.0:
                loss, grads = loss * weight, _tree_scale(grads, weight)
            grads_acc = grads if grads_acc is None else _tree_add(grads_acc, grads)
            step_loss += loss
            p.tokens += n_tok
            p.supervised_tokens += n_sup
    grads_acc, step_loss = dist.reduce_step(grads_acc, step_loss)  # average over ranks (no-op on one)
    if t.grad_accumulation > 1:
        grads_acc = _tree_scale(grads_acc, 1.0 / t.grad_accumulation)
        step_loss = step_loss / t.grad_accumulation
    if t.max_grad_norm:
        grads_acc, grad_norm = optim.clip_grad_norm(grads_acc, t.max_grad_norm)
    else:
        grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads_acc)))
    mx.eval(step_loss, grad_norm, grads_acc)
    loss_value, norm_value = step_loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        # `mlxft runs` reads this line to tell a diverged run from an interrupted one.
        s.run.log_metrics({"step": p.step + 1, "event": "diverged", "loss": str(loss_value), "grad_norm": str(norm_value)})
        raise TrainingDiverged(_divergence_message(s, p.step + 1, loss_value, norm_value))
    s.optimizer.update(s.model, grads_acc)
    mx.eval(s.model.state, s.optimizer.state)
    p.train_seconds += time.perf_counter() - tic
    p.step += 1
    p.last_loss = loss_value
    p.window_loss, p.window_n = p.window_loss + loss_value, p.window_n + 1
    p.since_val_loss, p.since_val_n = p.since_val_loss + loss_value, p.since_val_n + 1


def _loss_and_grad(s: Session, rows: list[Encoded]):
    """Loss and gradients of one micro-batch, through the shared-prefix forward where it pays."""
    if s.packed is not None:  # packed bins (with the shared prefix split off where it applies)
        loss, grads, _, _ = s.packed.loss_and_grad(s.model, rows)
        return loss, grads
    groups = s.shared.groups(rows) if s.shared is not None else None
    if groups:
        loss, grads, _, _ = s.shared.loss_and_grad(s.model, rows, groups)
        return loss, grads
    inputs, targets, idx, _, _ = collate(rows)
    return s.loss_and_grad(s.model, inputs, targets, idx)


def _divergence_message(s: Session, step: int, loss: float, norm: float) -> str:
    t = s.recipe.train
    ckpt = latest_checkpoint(s.run)
    kept = f"the last good checkpoint is {ckpt}" if ckpt else f"no checkpoint was written yet (the first comes at step {t.save_every})"
    clip = f"lower train.max_grad_norm (now {t.max_grad_norm})" if t.max_grad_norm else "set train.max_grad_norm=1.0 (now off)"
    precision = s.config.get("base_model", {}).get("precision", "?")
    return (
        f"training diverged at step {step}: loss {loss}, gradient norm {norm}; the step was not applied and {kept}. "
        f"Likely causes, most likely first: learning rate too high (try train.learning_rate={t.learning_rate / 5:.2g}, "
        f"now {t.learning_rate}); {clip}; a broken row in train.jsonl (empty, or extremely long); "
        f"fp16 overflow (the base is {precision}: use a bf16 or fp32 base). Change one and start a new run"
    )


def train_record(s: Session, p: Progress, extra: dict | None = None) -> dict:
    """The metrics.jsonl line for the steps since the last one (`extra`: method-specific means)."""
    return {
        "step": p.step,
        "train_loss": p.window_loss / p.window_n,
        **(extra or {}),
        "learning_rate": float(s.optimizer.learning_rate.item()),
        "tokens": p.tokens,
        "supervised_tokens": p.supervised_tokens,
        "tokens_per_sec": p.tokens / p.train_seconds,
        "supervised_tokens_per_sec": p.supervised_tokens / p.train_seconds,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "elapsed_sec": p.train_seconds,
    }


def _after_step(s: Session, p: Progress, write) -> None:
    """Metrics line every report_every steps; validation, best adapter and early stopping every val_every."""
    t = s.recipe.train
    last = p.step == s.steps
    if p.step % t.report_every == 0 or last:
        s.run.log_metrics(train_record(s, p))
        p.window_loss, p.window_n = 0.0, 0
    if s.valid_set and (p.step % t.val_every == 0 or last):
        _validate(s, p, write)


def _validate(s: Session, p: Progress, write) -> None:
    t = s.recipe.train
    s.model.eval()
    evaluate = functools.partial(validation_loss, shared=s.shared, packed=s.packed)
    p.val_loss = dist.validation_loss(evaluate, s.model, s.loss_fn, s.valid_set, t.batch_size, t.val_batches)
    s.model.train()
    s.run.log_metrics({"step": p.step, "val_loss": p.val_loss})
    write(f"step {p.step}: train loss {p.last_loss:.3f}, validation loss {p.val_loss:.3f}")
    p.history.append([p.val_loss, p.since_val_loss / max(p.since_val_n, 1)])
    p.since_val_loss, p.since_val_n = 0.0, 0
    if p.best_val_loss is None or p.val_loss < p.best_val_loss:
        p.best_val_loss, p.best_step = p.val_loss, p.step
        save_adapters(s.model, s.run.best_dir, s.adapter_cfg)
        s.config["best"] = {"step": p.step, "val_loss": p.val_loss, "path": str(s.run.best_dir)}
        s.run.write_config(s.config)
    if _overfitting(p.history):
        recent = [h[0] for h in p.history[-OVERFIT_RISES - 1 :]]
        s.run.log_metrics({"step": p.step, "event": "overfitting", "val_losses": recent})
        write(
            f"warning: validation loss rose {OVERFIT_RISES} validations in a row while train loss fell: the model is "
            f"memorising the training rows (best adapter so far: step {p.best_step}, kept in {s.run.best_dir})"
        )
    _early_stopping(s, p, write)


def _overfitting(history: list[list[float]]) -> bool:
    """True on the validation that completes OVERFIT_RISES rises in a row while train loss fell over them."""
    if len(history) < OVERFIT_RISES + 1:
        return False
    recent = history[-OVERFIT_RISES - 1 :]
    rising = all(b[0] > a[0] for a, b in zip(recent, recent[1:]))
    longer = len(history) > OVERFIT_RISES + 1 and history[-OVERFIT_RISES - 1][0] > history[-OVERFIT_RISES - 2][0]
    return rising and not longer and recent[-1][1] < recent[0][1]


def _early_stopping(s: Session, p: Progress, write) -> None:
    """Stop after `patience` validations without beating the reference by min_delta."""
    t = s.recipe.train
    if p.patience_ref is None or p.val_loss < p.patience_ref - t.early_stopping_min_delta:
        p.patience_ref, p.bad_evals = p.val_loss, 0
        return
    p.bad_evals += 1
    if t.early_stopping_patience and p.bad_evals >= t.early_stopping_patience:
        p.stop_reason = "early stopping"
        s.run.log_metrics({"step": p.step, "event": "early_stop", "best_step": p.best_step, "best_val_loss": p.best_val_loss})
        write(
            f"early stopping at step {p.step}: validation loss has not improved by {t.early_stopping_min_delta} "
            f"for {p.bad_evals} validations; best {p.best_val_loss:.4f} at step {p.best_step} ({s.run.best_dir})"
        )


def _finish(s: Session, p: Progress) -> TrainResult:
    """Final adapters, final checkpoint (marked finished) and the result in config.json."""
    result = save_final(s, p)
    s.log(
        f"done: {p.step} steps in {p.train_seconds:.0f}s, {result.tokens_per_sec:.0f} tokens/s "
        f"({result.supervised_tokens_per_sec:.1f} supervised/s), peak memory {result.peak_memory_gb:.2f} GB; "
        f"adapters in {s.run.adapters}" + (f" (best: {s.run.best_dir}, step {p.best_step})" if p.best_step else "")
    )
    return result


def save_final(s, p, extra: dict | None = None) -> TrainResult:
    """The end of a run, SFT or preference: final adapters, final checkpoint (marked finished), the
    result (plus `extra`) in config.json."""
    stopped_early = p.stop_reason == "early stopping"
    p.stop_reason = p.stop_reason or "done"
    save_adapters(s.model, s.run.adapters, s.adapter_cfg)
    save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, s.recipe.train.keep_checkpoints)
    seconds = max(p.train_seconds, 1e-9)
    result = TrainResult(
        run=s.run,
        steps=p.step,
        final_train_loss=p.last_loss,
        final_val_loss=p.val_loss,
        seconds=p.train_seconds,
        supervised_tokens_per_sec=p.supervised_tokens / seconds,
        tokens_per_sec=p.tokens / seconds,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        best_val_loss=p.best_val_loss,
        best_step=p.best_step,
        stopped_early=stopped_early,
    )
    s.config["result"] = {k: v for k, v in result.__dict__.items() if k != "run"} | (extra or {})
    s.config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    s.run.write_config(s.config)
    return result


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * s, a)
