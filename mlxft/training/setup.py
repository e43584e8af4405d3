"""`mlxft train`: a fresh start or a resume, up to the loop.

    mlxft train RECIPE [--data DIR] [--set k=v ...]      # train(recipe, data_dir)
    mlxft train --resume RUN                           # resume(run)

Set-up is the same for every method: the settings checked, the data read, checked and encoded
once (mlxft/data/training_data.py), the memory plan (SFT), the base loaded, the method's
objective built, adapters attached, the optimizer, the speed paths chosen once, and the run card
(config.json: the resolved recipe, data hashes, base model, library versions, machine). Then
loop.fit runs it. A method is an objective registered in OBJECTIVES.

We reuse mlx-lm for model loading, LoRA/DoRA layers and schedules, and write the loop ourselves
because we need what mlx-lm's trainer lacks: loss on every assistant turn, logits only where
there is a loss, length-bucketed batches, run folders with metrics, and full-state checkpoints
that resume bit-identically (checkpoint.py).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import time
from pathlib import Path

import numpy as np

import mlxft
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlxft.config import Recipe, TrainConfig
from mlxft.data.training_data import SPLITS, TrainingData, load_training_data
from mlxft.doctor import chip, memory_bytes
from mlxft.errors import ConfigError, DataError, MlxftError
from mlxft.files import sha256_file
from mlxft.models.load import BaseModel, load_base
from mlxft.recipes import resolve_data_dir
from mlxft.runs.format import check_resumable, version_note
from mlxft.runs.run import Run, RunDir
from mlxft.training import distributed as dist
from mlxft.training.adapters import adapter_config, attach_adapters, build_schedule, total_steps
from mlxft.training.checkpoint import describe_skipped, newest_complete_checkpoint, read_progress, truncate_metrics
from mlxft.training.fast.paths import speed_paths
from mlxft.training.loop import TrainResult, fit
from mlxft.training.objective import Objective, Session
from mlxft.training.plan import check_fits
from mlxft.training.grpo import GRPO
from mlxft.training.preference import Preference
from mlxft.training.progress import Progress
from mlxft.training.sft import SFT

# train.method -> the objective that trains it (each has `from_data(recipe, data)`).
OBJECTIVES: dict[str, type] = {"sft": SFT, "dpo": Preference, "orpo": Preference, "grpo": GRPO}


def train(recipe: Recipe, data_dir: str | Path | None = None, runs_root: Path | None = None, log=print,
          auto_fit: bool = False) -> TrainResult:
    """Fine-tune the recipe's base model on `data_dir` and write a run folder.

    The memory plan gates an SFT run first: it is refused when it will not fit the tier, or with
    `auto_fit` changed until it does."""
    check_train_settings(recipe.train)
    data_dir = resolve_data_dir(data_dir or recipe.data.path)
    data = load_training_data(recipe, data_dir, log)
    objective = build_objective(recipe, data)
    if recipe.train.method == "sft":  # the memory plan models SFT steps (plan.py)
        recipe = check_fits(recipe, data_dir, auto_fit, log, rows=objective.train_set)
    base = _load_base(recipe, data, log)
    run = dist.create_run(recipe.name, runs_root)  # rank 0 creates it; other ranks never write
    s, objective = _prepare(recipe, base, data, objective, run, {}, log)
    s.config = run_card(recipe, base, data_dir, objective, s.steps)
    dist.check_same_start(s.config, s.model)  # every rank: same data, base, versions and start weights
    run.write_config(s.config)
    t = recipe.train
    label = "" if objective.name == "train" else f"{objective.name.upper()}: "
    log(f"run folder: {run.root}")
    log(
        f"{label}training {s.config['trainable_parameters'] / 1e6:.2f}M of {s.config['total_parameters'] / 1e6:.1f}M "
        f"parameters ({recipe.fine_tune_type}), {len(objective.train_set)} train / {len(objective.valid_set)} valid "
        f"{objective.unit}, {s.steps} steps of batch {t.batch_size}x{t.grad_accumulation}"
    )
    return fit(s, objective, Progress())


def resume(run_path: str | Path, log=print) -> TrainResult:
    """Continue RUN from its newest checkpoint with the recipe and data recorded in its config.json."""
    root, ckpt, config, notes = dist.on_main(_open_resumable, str(run_path))  # only rank 0 has the run folder
    for note in [*notes, version_note(config)]:  # a damaged newest checkpoint; a run from another mlxft version
        if note:
            log(note)
    run, ckpt = Run(RunDir(Path(root)), config), Path(ckpt)
    dist.remember_run(run.root)
    recipe = run.recipe
    _check_same_data(run.data_path, run.data_sha256)
    data = load_training_data(recipe, run.data_path, log)
    objective = build_objective(recipe, data)
    base = _load_base(recipe, data, log)
    s, objective = _prepare(recipe, base, data, objective, run.folder, config, log)
    progress = dist.load_checkpoint(ckpt, s.model, s.optimizer)
    truncate_metrics(run.folder, progress.step)
    run.folder.log_metrics({"step": progress.step, "event": "resumed", "checkpoint": ckpt.name})
    config.setdefault("resumed", []).append({"from_step": progress.step, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    run.folder.write_config(config)
    log(f"resuming {run.root} from {ckpt.name} (step {progress.step} of {s.steps})")
    if run.versions != versions():  # other kernels: close to, but not bit-identical with, a straight run
        log(f"note: library versions differ from the run's start ({run.versions} -> {versions()})")
    return fit(s, objective, progress)


def build_objective(recipe: Recipe, data: TrainingData) -> Objective:
    """The objective of `recipe.train.method`, with its items encoded from `data`."""
    method = recipe.train.method
    if method not in OBJECTIVES:
        raise ConfigError(f"train.method={method}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[method].from_data(recipe, data)


def _load_base(recipe: Recipe, data: TrainingData, log) -> BaseModel:
    base = load_base(recipe.model.source, recipe.quantize, tokenizer=data.tokenizer,
                     default_template=data.default_template)
    log(f"base model: {base.path} [{base.precision}]")
    log(base.note)
    if base.default_template:
        log("the base model has no chat template: using mlxft's default ChatML template (recorded in the run)")
    return base


def _prepare(recipe: Recipe, base: BaseModel, data: TrainingData, objective: Objective, run: RunDir, config: dict,
             log) -> tuple[Session, Objective]:
    """Work on the bare base (DPO's reference), seed, attach adapters, the optimizer and the objective's
    forward: the same on a fresh start and on resume."""
    t = recipe.train
    dist.check_batch_size(t.batch_size)
    model = base.model
    objective.before_adapters(model, log)
    mx.random.seed(t.seed)
    np.random.seed(t.seed)
    attach_adapters(model, recipe)
    model.train()
    steps = total_steps(recipe, len(objective.train_set))
    optimizer = optim.AdamW(learning_rate=build_schedule(recipe, steps), weight_decay=t.weight_decay)
    paths = speed_paths(recipe, model)  # checked on the model itself: its blocks must be drivable one by one
    if t.packing and not paths.packing:
        log(f"note: train.packing is off for this run (grad_checkpoint, or the {recipe.model.family} family); training unpacked")
    objective.attach(model, paths)
    adapter_cfg = adapter_config(recipe, len(model.layers), base.path, base.tokenizer.chat_template)
    return Session(recipe, run, config, adapter_cfg, model, optimizer, steps, paths, log), objective


def run_card(recipe: Recipe, base: BaseModel, data_dir: Path, objective: Objective, steps: int) -> dict:
    """config.json: the resolved recipe, data hashes, base model, library versions, machine."""
    n_trainable = sum(v.size for _, v in tree_flatten(base.model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(base.model.parameters()))
    return {
        "recipe": recipe.to_dict(),
        "data": {
            "path": str(data_dir.resolve()),
            "sha256": {s: sha256_file(data_dir / f"{s}.jsonl") for s in SPLITS},
            **objective.describe_data(),
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
                    "chip": chip(), "cpu_count": os.cpu_count(), "memory_gb": round(memory_bytes()[0] / 1e9, 1)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **objective.config_sections(),
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "mlxft": mlxft.__version__}
    for name in ("mlx", "mlx-lm", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


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


def _open_resumable(run_path: str) -> list:
    """[run folder, newest complete checkpoint, config.json, notes] of a run that can be resumed; a
    damaged newest checkpoint (truncated, corrupted) is skipped for the one before it, and said so."""
    run = RunDir.open(run_path)
    config = run.read_config()
    check_resumable(config, run.config)
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
        if not path.is_file() or sha256_file(path) != digest:
            raise DataError(
                f"{path} is missing or changed since the run started; resuming would not continue the same run "
                "(start a new run instead)"
            )
