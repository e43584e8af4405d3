"""Full-state training checkpoints: written atomically, the last K kept, loaded to resume exactly.

`mlxft train` writes one every `train.save_every` steps and at the end; `mlxft train --resume RUN`
loads the newest. A checkpoint is `RUN/checkpoints/step-000040/`:

    adapters.safetensors    the trainable weights (+ adapter_config.json, so stock mlx-lm loads it)
    optimizer.safetensors   AdamW moments and its step counter (= the learning-rate schedule position)
    state.json              step, data position (epoch, index into the epoch's batch order), RNG states, counters,
                            early-stopping and overfitting-alarm history

It is written into a hidden temporary folder and renamed into place, so a crash at any moment
leaves either the whole checkpoint or none of it: never weights from one step with state from another.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.errors import MlxftError
from mlxft.files import fsync_path, write_atomic
from mlxft.rank import is_main
from mlxft.runs.run import RunDir
from mlxft.training.progress import Progress

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(MlxftError):
    """A checkpoint is missing, or does not match the run it is loaded into."""


def capture_rng() -> dict:
    """mx.random's key (dropout draws from it) and numpy's global RNG, exactly."""
    hi, lo = mx.random.state[0].tolist()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"mx_key": [hi, lo], "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}


def restore_rng(rng: dict) -> None:
    # mx.random.state is read-only; seeding with the 64-bit value of the key sets the key itself.
    hi, lo = rng["mx_key"]
    mx.random.seed((hi << 32) | lo)
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_adapters(model: nn.Module, out_dir: Path, config: dict) -> None:
    """Write adapters.safetensors + adapter_config.json, each file atomically (rank 0 only)."""
    if not is_main():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    tmp = out_dir / f".adapters-{os.getpid()}.safetensors"
    mx.save_safetensors(str(tmp), weights)
    fsync_path(tmp)
    os.replace(tmp, out_dir / "adapters.safetensors")
    write_atomic(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def save_checkpoint(
    run: RunDir, model: nn.Module, optimizer: optim.Optimizer, progress: Progress, adapter_cfg: dict, keep: int
) -> Path:
    """Write the full training state at `progress.step` atomically, then drop all but the newest `keep`."""
    final = run.checkpoint(progress.step)
    if not is_main():  # data-parallel: rank 0 holds the same state and writes it
        return final
    tmp = run.checkpoints / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapters(model, tmp, adapter_cfg)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    fsync_path(tmp / "optimizer.safetensors")
    progress.rng = capture_rng()
    write_atomic(tmp / "state.json", json.dumps(dataclasses.asdict(progress), indent=1) + "\n")
    if final.exists():  # a resumed run replaying a step it had saved before: same content
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(run.checkpoints)
    prune_checkpoints(run, keep)
    return final


def list_checkpoints(run: RunDir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are skipped)."""
    if not run.checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: RunDir) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def prune_checkpoints(run: RunDir, keep: int) -> None:
    """Keep the newest `keep` checkpoints; also clear temporary folders a killed writer left."""
    for old in list_checkpoints(run)[: -max(keep, 1)]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run.checkpoints.glob(".tmp-*"):
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer) -> Progress:
    """Put the checkpoint's weights, optimizer state and RNG states back; return its Progress."""
    weights = mx.load(str(path / "adapters.safetensors"))
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise CheckpointError(
            f"{path} does not match this run's trainable parameters (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    model.load_weights(list(weights.items()), strict=False)
    # init() keeps state that is already there, so the loaded moments survive the first update.
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    progress = read_progress(path)
    restore_rng(progress.rng)
    return progress


def read_progress(path: Path) -> Progress:
    """A checkpoint's state.json, without touching its tensors."""
    fields = {f.name for f in dataclasses.fields(Progress)}
    state = json.loads((path / "state.json").read_text())
    return Progress(**{k: v for k, v in state.items() if k in fields})


def truncate_metrics(run: RunDir, step: int) -> None:
    """Drop metrics logged after `step`: the resumed run logs those steps again."""
    if not run.metrics.is_file() or not is_main():
        return
    lines = run.metrics.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    write_atomic(run.metrics, "".join(line + "\n" for line in kept))
