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
import struct
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.errors import MlxftError, WriteError
from mlxft.files import fsync_path, sha256_file, write_atomic, write_error
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
    """Write adapters.safetensors + adapter_config.json, each file atomically (rank 0 only).

    A failed write (a full disk) raises WriteError naming the file; the previous one stays."""
    if not is_main():
        return
    weights = dict(tree_flatten(model.trainable_parameters()))
    save_arrays_atomic(out_dir / "adapters.safetensors", weights)
    write_atomic(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")


def save_arrays_atomic(path: Path, arrays: dict) -> None:
    """mx.save_safetensors through a temporary file renamed into place: the old file or the new, never
    half of one. mlx reports a failed write as RuntimeError; both it and OSError become WriteError."""
    tmp = path.parent / f".{path.stem}-{os.getpid()}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(tmp), arrays)
        fsync_path(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e


def save_checkpoint(
    run: RunDir, model: nn.Module, optimizer: optim.Optimizer, progress: Progress, adapter_cfg: dict, keep: int
) -> Path:
    """Write the full training state at `progress.step` atomically, then drop all but the newest `keep`."""
    final = run.checkpoint(progress.step)
    if not is_main():  # data-parallel: rank 0 holds the same state and writes it
        return final
    tmp = run.checkpoints / f".tmp-{final.name}-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapters(model, tmp, adapter_cfg)
        save_arrays_atomic(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        progress.rng = capture_rng()
        state = dataclasses.asdict(progress) | {"files": _file_hashes(tmp)}  # lets resume tell a damaged one
        write_atomic(tmp / "state.json", json.dumps(state, indent=1) + "\n")
        if final.exists():  # a resumed run replaying a step it had saved before: same content
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(run.checkpoints)
    except OSError as e:  # a full disk: the half-written folder goes, the checkpoints before it stay
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run)
        failed = Path(getattr(e, "path", None) or tmp).name
        reason = os.strerror(e.errno) if e.errno else str(e.__cause__ or e)
        raise WriteError(
            f"could not write checkpoint {final} ({failed}: {reason}); "
            + (f"the previous checkpoint {previous.name} is complete and unchanged: resume from it with "
               f"mlxft train --resume {run.root}" if previous else "no earlier checkpoint exists"), final, e.errno) from e
    prune_checkpoints(run, keep)
    return final


def _file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def list_checkpoints(run: RunDir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are skipped)."""
    if not run.checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: RunDir) -> Path | None:
    found = list_checkpoints(run)
    return found[-1] if found else None


def newest_complete_checkpoint(run: RunDir) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint whose files are all there and intact, and the newer ones skipped with why
    (a truncated or corrupted file, a state.json that does not parse). Resume starts from the first."""
    skipped = []
    for path in reversed(list_checkpoints(run)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def describe_skipped(skipped: list[tuple[Path, str]], chosen: Path | None) -> list[str]:
    """One line per damaged checkpoint passed over, saying which one resume uses instead."""
    instead = f"using {chosen.name} instead" if chosen else "no complete checkpoint is left"
    return [f"note: checkpoint {path.name} is damaged ({why}); {instead}" for path, why in skipped]


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete.

    Checks that each file is there and parses; a checkpoint that recorded its files' sha256
    (every one written since they were added) must match them byte for byte."""
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return f"state.json cannot be read: {e}"
    problem = _state_problem(state)
    if problem:
        return f"state.json {problem}"
    for name in ("adapters.safetensors", "optimizer.safetensors", "adapter_config.json"):
        if not (path / name).is_file():
            return f"{name} is missing"
    recorded = state.get("files")
    if isinstance(recorded, dict):
        for name, digest in recorded.items():
            if not (path / name).is_file() or sha256_file(path / name) != digest:
                return f"{name} differs from the sha256 recorded when it was written (truncated or corrupted)"
        return None
    for name in ("adapters.safetensors", "optimizer.safetensors"):  # older checkpoints: structure only
        problem = safetensors_problem(path / name)
        if problem:
            return f"{name}: {problem}"
    return None


def _state_problem(state) -> str | None:
    """What is wrong with a parsed state.json (its own bytes are not in the recorded hashes), or None."""
    if not isinstance(state, dict) or isinstance(state.get("step"), bool) or not isinstance(state.get("step"), int):
        return "lacks the step"
    rng = state.get("rng")
    try:
        (hi, lo), (kind, keys, pos, has_gauss, gauss) = rng["mx_key"], rng["numpy"]
        ok = (all(isinstance(x, int) and 0 <= x < 2**32 for x in (hi, lo, pos)) and isinstance(kind, str)
              and isinstance(keys, list) and len(keys) == 624 and all(isinstance(k, int) and 0 <= k < 2**32 for k in keys)
              and isinstance(has_gauss, int) and isinstance(gauss, (int, float)))
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        return "has a malformed RNG state"
    numbers = ("epoch", "position", "tokens", "supervised_tokens", "window_n", "since_val_n", "bad_evals")
    if any(isinstance(state.get(k, 0), bool) or not isinstance(state.get(k, 0), int) for k in numbers):
        return "has a counter that is not an integer"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is not whole (its header and sizes do not add up), or None."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 * 2**20):
                return f"header of {n} bytes in a {size}-byte file (truncated)"
            header = json.loads(f.read(n))
    except (struct.error, OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return f"unreadable header ({e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
            and isinstance(v["data_offsets"][1], int)]
    if len(ends) != len([k for k in header if k != "__metadata__"]):
        return "a tensor entry without data offsets"
    if 8 + n + max(ends, default=0) != size:
        return f"{size} bytes where the header describes {8 + n + max(ends, default=0)} (truncated)"
    return None


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
