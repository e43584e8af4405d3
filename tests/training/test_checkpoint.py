"""Faults besides a kill: a full disk while writing a checkpoint, the adapters, eval.json or a prepared
dataset leaves the previous complete file and names the path; a damaged newest checkpoint makes
`--resume` fall back to the one before it, and say so."""

import errno
import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlxft.training import checkpoint as ckpt_mod
from mlxft import files as runs_mod
from mlxft.training.checkpoint import (
    checkpoint_problem, list_checkpoints, newest_complete_checkpoint, save_adapters, save_checkpoint,
)
from mlxft.cli import main
from mlxft.errors import MlxftError, WriteError
from mlxft.recipes import load_recipe
from mlxft.files import write_atomic
from mlxft.runs.run import RunDir
from mlxft.training.setup import resume, train

ITERS, SAVE_EVERY = 20, 5


def overrides(tiny_model):
    return [f"model.source={tiny_model}", f"train.iters={ITERS}", f"train.save_every={SAVE_EVERY}",
            "train.batch_size=8", "train.learning_rate=3e-3", "train.val_every=40", "train.val_batches=1",
            "train.keep_checkpoints=4", "lora.num_layers=2", "lora.rank=4", "train.max_seq_length=64"]


@pytest.fixture(scope="module")
def finished_run(tiny_model, tiny_data, tmp_path_factory):
    recipe = load_recipe("smollm2-135m", tier=8, overrides=overrides(tiny_model))
    return train(recipe, tiny_data, tmp_path_factory.mktemp("ckpt-runs"), log=lambda *_: None).run.root


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run, its last checkpoint removed: a run killed after step 15's checkpoint."""
    root = tmp_path / "run"
    shutil.copytree(finished_run, root)
    shutil.rmtree(root / "checkpoints" / f"step-{ITERS:06d}")
    return RunDir(root)


def no_space(*_args, **_kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapters_of(root: Path) -> dict:
    return mx.load(str(root / "adapters" / "adapters.safetensors"))


# ---------------------------------------------------------------- a full disk


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(run_copy, tiny_model, monkeypatch):
    from mlx_lm.utils import load
    import mlx.optimizers as optim

    from mlxft.training.progress import Progress
    from mlxft.training.adapters import attach_adapters

    recipe = load_recipe("smollm2-135m", tier=8, overrides=overrides(tiny_model))
    model, _ = load(str(tiny_model))
    attach_adapters(model, recipe)
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    before = snapshot(run_copy.checkpoints)
    real_save = mx.save_safetensors

    def save(path, arrays, *a, **kw):  # the disk fills while the optimizer state is written
        if "optimizer" in Path(path).name:
            no_space()
        real_save(path, arrays, *a, **kw)

    monkeypatch.setattr(ckpt_mod.mx, "save_safetensors", save)
    with pytest.raises(WriteError) as e:
        save_checkpoint(run_copy, model, optimizer, Progress(step=25), {"fine_tune_type": "lora"}, keep=4)
    msg = str(e.value)
    assert "step-000025" in msg and "optimizer.safetensors" in msg and "No space left on device" in msg
    assert f"previous checkpoint step-{15:06d} is complete and unchanged" in msg
    assert snapshot(run_copy.checkpoints) == before  # no half-written folder, nothing older touched
    assert not list(run_copy.checkpoints.glob(".tmp-*"))


def test_full_disk_while_writing_the_adapters_keeps_the_previous_file(run_copy, monkeypatch):
    old = (run_copy.adapters / "adapters.safetensors").read_bytes()
    monkeypatch.setattr(ckpt_mod.mx, "save_safetensors", no_space)
    model = type("M", (), {"trainable_parameters": lambda self: {"w": mx.zeros((2,))}})()
    with pytest.raises(WriteError, match=r"adapters/adapters.safetensors \(No space left on device\); "
                                         r"the previous adapters.safetensors is unchanged"):
        save_adapters(model, run_copy.adapters, {})
    assert (run_copy.adapters / "adapters.safetensors").read_bytes() == old
    assert sorted(p.name for p in run_copy.adapters.iterdir() if p.name.startswith(".")) == []


def test_full_disk_while_writing_eval_json_keeps_the_previous_one(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    target.write_text('{"suites": {}}\n')
    monkeypatch.setattr(runs_mod.os, "fsync", no_space)  # where a delayed-allocation ENOSPC surfaces
    with pytest.raises(WriteError, match=r"eval.json \(No space left on device\); the previous eval.json is unchanged"):
        write_atomic(target, json.dumps({"suites": {"new": 1}}))
    assert target.read_text() == '{"suites": {}}\n' and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_eval_on_a_full_disk_is_one_message_naming_eval_json(tiny_model, tiny_data, tmp_path, monkeypatch):
    from lora_fixtures import make_adapter_run

    from conftest import SYSTEM

    run = make_adapter_run(tmp_path / "run", tiny_model, seed=1, system_prompt=SYSTEM, data_dir=tiny_data)
    (run / "eval.json").write_text("{}\n")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"data: {tiny_data / 'test.jsonl'}\ngeneration: {{max_tokens: 2}}\n"
                     "scorers:\n  - {name: em, type: exact_match}\n")
    monkeypatch.setattr(runs_mod.os, "fsync", no_space)
    res = CliRunner().invoke(main, ["eval", str(run), "--suite", str(suite)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output  # a message, not a traceback
    assert f"could not write {run / 'eval.json'} (No space left on device)" in res.output
    assert (run / "eval.json").read_text() == "{}\n"


def test_full_disk_while_preparing_a_dataset_leaves_nothing(tmp_path, monkeypatch):
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(40)))
    real = Path.write_bytes

    def write_bytes(self, data):
        if self.name == "valid.jsonl":
            no_space()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["data", "prepare", str(src), str(out), "--model", str(tmp_path / "none")])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert f"could not write {out / 'valid.jsonl'} (No space left on device); nothing was written to {out}" in res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.jsonl"]  # no OUT, no temporary folder


# ---------------------------------------------------------------- a damaged newest checkpoint


@pytest.mark.parametrize("damage", ["truncate", "flip", "state"])
def test_damaged_newest_checkpoint_falls_back_and_resumes_to_the_same_adapter(finished_run, run_copy, damage):
    newest = list_checkpoints(run_copy)[-1]
    assert newest.name == "step-000015" and checkpoint_problem(newest) is None
    if damage == "truncate":  # a crash or a full disk mid-file, below the atomic rename
        f = newest / "optimizer.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip":  # one bit flipped on disk: same size, same header
        f = newest / "adapters.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x10
        f.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text('{"step": 15, "epo')
    chosen, skipped = newest_complete_checkpoint(run_copy)
    assert chosen.name == "step-000010" and [p.name for p, _ in skipped] == ["step-000015"]
    lines = []
    res = resume(run_copy.root, log=lines.append)
    assert any("checkpoint step-000015 is damaged" in line and "using step-000010 instead" in line
               for line in lines), lines
    assert res.steps == ITERS
    want, got = adapters_of(finished_run), adapters_of(run_copy.root)
    assert sorted(want) == sorted(got) and all(mx.array_equal(want[k], got[k]).item() for k in want)


def test_older_checkpoints_without_hashes_are_checked_by_structure(run_copy):
    newest = list_checkpoints(run_copy)[-1]
    state = json.loads((newest / "state.json").read_text())
    del state["files"]
    (newest / "state.json").write_text(json.dumps(state))
    assert checkpoint_problem(newest) is None
    f = newest / "adapters.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert "truncated" in checkpoint_problem(newest)


def test_every_checkpoint_damaged_is_one_clear_message(run_copy):
    for path in list_checkpoints(run_copy):
        (path / "adapters.safetensors").unlink()
    with pytest.raises(MlxftError, match="no checkpoint to resume from .*step-000015 is damaged: adapters.safetensors is missing"):
        resume(run_copy.root, log=lambda *_: None)
