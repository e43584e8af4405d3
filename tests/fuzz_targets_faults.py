"""Fault targets: a full disk at every place mlxft writes a file a user keeps, and damaged checkpoints.

Hand-written: ENOSPC (simulated where the write happens) while writing a checkpoint, the adapters,
eval.json, config.json, a prepared dataset, a `--fix` copy and an imported model; each must be a typed
error naming the path, with every file that was there before unchanged ("inputs modified" counts a
changed or half-written file). Fuzzed: one file of the newest checkpoint of a real run damaged at
random (cut, bits flipped, bytes inserted, deleted): resume's choice must be a checkpoint that loads,
or a clear refusal, and the run folder must stay as it was.
"""

from __future__ import annotations

import errno
import json
import shutil
import tempfile
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from unittest import mock

from hypothesis import strategies as st

from fuzz_harness import Outcome, mutate, probe, workdir
from fuzz_targets import GOOD_ROW, Target, _jsonl
from mlxft.errors import WriteError

CHECKPOINT_FILES = ("adapters.safetensors", "optimizer.safetensors", "state.json", "adapter_config.json")


@lru_cache(maxsize=1)
def finished_run() -> tuple[Path, object]:
    """A real 15-step run of the tiny model, checkpoints at 5, 10, 15, and its recipe (made once, ~3 s)."""
    from conftest import make_tiny_llama
    from mlxft.recipes import load_recipe
    from mlxft.training.setup import train

    root = Path(tempfile.mkdtemp(prefix="mlxft-fuzz-faults-"))
    model = make_tiny_llama(root / "tiny")
    data = root / "data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"say {w} {i}"}, {"role": "assistant", "content": w}]}
            for i in range(24) for w in ("alpha", "beta")]
    (data / "train.jsonl").write_bytes(_jsonl(rows[:40]))
    (data / "valid.jsonl").write_bytes(_jsonl(rows[40:]))
    recipe = load_recipe("smollm2-135m", tier=8, overrides=[
        f"model.source={model}", "train.iters=15", "train.save_every=5", "train.batch_size=4", "train.val_every=40",
        "train.keep_checkpoints=3", "lora.num_layers=2", "lora.rank=4", "train.max_seq_length=256"])
    run = train(recipe, data, root / "runs", log=lambda *_: None).run.root
    return run, recipe


@lru_cache(maxsize=1)
def model_and_optimizer():
    import mlx.optimizers as optim
    from mlx_lm.utils import load

    from mlxft.training.adapters import attach_adapters

    run, recipe = finished_run()
    model, _ = load(recipe.model.source)
    attach_adapters(model, recipe)
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    return model, optimizer


def copy_run(tmp: Path) -> Path:
    run, _ = finished_run()
    shutil.copytree(run, tmp / "run")
    return tmp / "run"


# ---------------------------------------------------------------- damaged checkpoints (fuzzed)


@lru_cache(maxsize=1)
def damage_strategy():
    run, _ = finished_run()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    damaged = st.sampled_from(CHECKPOINT_FILES).flatmap(
        lambda name: st.tuples(st.just(name), mutate((newest / name).read_bytes()) | st.just(None)))
    return st.lists(damaged, min_size=1, max_size=2)


def run_damaged(damage) -> Outcome:
    from mlxft.training.checkpoint import list_checkpoints, load_checkpoint, newest_complete_checkpoint
    from mlxft.runs.run import RunDir

    with workdir() as tmp:
        run = RunDir(copy_run(tmp))
        newest = list_checkpoints(run)[-1]
        for name, data in damage:  # None: the file is gone
            (newest / name).unlink(missing_ok=True)
            if data is not None:
                (newest / name).write_bytes(data)

        def call():
            chosen, _ = newest_complete_checkpoint(run)
            if chosen is not None:  # what resume would load: it must load, whatever happened to the newest
                load_checkpoint(chosen, *model_and_optimizer())

        return probe(call, [run.root])


# ---------------------------------------------------------------- a full disk (hand-written)


def no_space(*_a, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _save_only(real, word):
    def save(path, *a, **kw):
        if word in Path(path).name:
            no_space()
        return real(path, *a, **kw)
    return save


def full_disk(where: str) -> Outcome:
    import mlx.core as mx

    from mlxft import files as runs
    from mlxft.training import checkpoint
    from mlxft.training.progress import Progress
    from mlxft.training.checkpoint import read_progress, save_adapters, save_checkpoint
    from mlxft.data.check import check_path
    from mlxft.data.prepare import prepare_dataset, write_clean
    from mlxft.runs.run import RunDir

    with workdir() as tmp, ExitStack() as patches:
        run = RunDir(copy_run(tmp))
        src = tmp / "src.jsonl"
        src.write_bytes(_jsonl([GOOD_ROW] + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)]))
        (run.root / "eval.json").write_text('{"suites": {}}\n')
        model, optimizer = model_and_optimizer()
        cfg = json.loads((run.adapters / "adapter_config.json").read_text())
        calls = {
            "checkpoint (optimizer state)": (lambda: save_checkpoint(run, model, optimizer, Progress(step=20), cfg, 3),
                                             ("checkpoint", mx, "save_safetensors", _save_only(mx.save_safetensors, "optim"))),
            "checkpoint (state.json)": (lambda: save_checkpoint(run, model, optimizer, read_progress(
                run.checkpoint(15)), cfg, 3), ("runs", runs.os, "fsync", no_space)),
            "adapters": (lambda: save_adapters(model, run.adapters, cfg), ("checkpoint", mx, "save_safetensors", no_space)),
            "eval.json": (lambda: runs.write_atomic(run.eval_json, "{}"), ("runs", runs.os, "fsync", no_space)),
            "config.json": (lambda: run.write_config(run.read_config()), ("runs", runs.os, "fsync", no_space)),
            "prepared dataset": (lambda: prepare_dataset(src, tmp / "out"), ("path", Path, "write_bytes", no_space)),
            "data check --fix copy": (lambda: write_clean(check_path(src), tmp / "fixed"),
                                      ("path", Path, "write_bytes", no_space)),
        }
        call, (_, owner, attr, fake) = calls[where]
        assert checkpoint.mx is mx
        patches.enter_context(mock.patch.object(owner, attr, fake))

        def checked():
            try:
                call()
            except WriteError as e:
                assert "No space left on device" in str(e) and str(e.path) in str(e), str(e)
                assert not list(tmp.glob(".*")) and not list((tmp / "run").rglob(".tmp-*")), "half-written files left"
                raise
            raise AssertionError(f"{where}: the write went through a full disk")

        return probe(checked, [run.root, src])


FULL_DISK = ["checkpoint (optimizer state)", "checkpoint (state.json)", "adapters", "eval.json", "config.json",
             "prepared dataset", "data check --fix copy"]


def run_fault(case) -> Outcome:
    kind, value = case
    return full_disk(value) if kind == "full disk" else run_damaged(value)


def _hand_faults():
    cases = [(f"full disk: {w}", ("full disk", w)) for w in FULL_DISK]
    for name in CHECKPOINT_FILES:
        cases.append((f"{name} missing", ("damage", [(name, None)])))
        cases.append((f"{name} cut in half", ("damage", [(name, "half")])))
    cases += [("state.json not JSON", ("damage", [("state.json", b"{oops")])),
              ("state.json RNG a string", ("damage", [("state.json", b'{"step": 15, "rng": "x"}')]))]
    return cases


def _resolve(case):
    """("damage", [(name, "half")]) -> the newest checkpoint's file cut in half."""
    kind, value = case
    if kind != "damage":
        return case
    run, _ = finished_run()
    newest = sorted((run / "checkpoints").iterdir())[-1]
    return kind, [(n, (newest / n).read_bytes()[: (newest / n).stat().st_size // 2] if d == "half" else d)
                  for n, d in value]


FAULTS = Target("faults: full disk, damaged checkpoints", None, None, lambda case: run_fault(_resolve(case)))


def faults_target() -> Target:
    """FAULTS with its strategy and hand cases built (they need the real run, made on first use)."""
    FAULTS.strategy = damage_strategy().map(lambda d: ("damage", d))
    FAULTS.hand = _hand_faults()
    return FAULTS
