"""Training you can trust: kill -9 or Ctrl-C a real `mlxft train` process, resume, and get the same adapter."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlxft.training.checkpoint import list_checkpoints
from tiny_run import wait_for_checkpoint
from mlxft.errors import MlxftError
from mlxft.recipes import load_recipe
from mlxft.training.setup import resume, train

ITERS = 80
SAVE_EVERY = 5


def overrides(tiny_model):
    # dropout > 0 on purpose: resume must restore the mx.random key, not just the weights.
    return [f"model.source={tiny_model}", f"train.iters={ITERS}", f"train.save_every={SAVE_EVERY}",
            "train.batch_size=8", "train.learning_rate=3e-3", "train.warmup_steps=5", "train.val_every=40",
            "train.val_batches=1", "train.keep_checkpoints=2", "lora.num_layers=2", "lora.rank=4", "lora.dropout=0.1",
            "train.max_seq_length=64"]


def cli_train(tiny_model, tiny_data, runs_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlxft.cli", "train", "smollm2-135m", "--tier", "8", "--data", str(tiny_data),
           "--runs-dir", str(runs_dir)]
    for item in overrides(tiny_model):
        cmd += ["--set", item]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def adapters(run_root: Path) -> dict:
    return mx.load(str(run_root / "adapters" / "adapters.safetensors"))


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), f"{k} differs"


@pytest.fixture(scope="module")
def straight(tiny_model, tiny_data, tmp_path_factory):
    """The uninterrupted run every resumed run must reproduce exactly."""
    recipe = load_recipe("smollm2-135m", tier=8, overrides=overrides(tiny_model))
    res = train(recipe, tiny_data, tmp_path_factory.mktemp("straight"), log=lambda *_: None)
    return res.run.root


def train_losses(run_root: Path) -> list:
    lines = (run_root / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["train_loss"]) for m in map(json.loads, lines) if "train_loss" in m]


def test_sigkill_at_a_random_step_then_resume_gives_the_same_adapter(straight, tiny_model, tiny_data, tmp_path):
    kill_after = random.randint(SAVE_EVERY, ITERS - 3 * SAVE_EVERY)
    proc = cli_train(tiny_model, tiny_data, tmp_path)
    run = wait_for_checkpoint(proc, tmp_path, kill_after)
    time.sleep(random.uniform(0, 0.05))  # land mid-step or mid-checkpoint, not just on a boundary
    proc.kill()
    proc.wait()
    stopped_at = int(list_checkpoints(run)[-1].name.split("-")[1])
    assert stopped_at < ITERS, "the run finished before it was killed"
    assert not (run.adapters / "adapters.safetensors").exists()

    res = resume(run.root, log=lambda *_: None)

    assert res.steps == ITERS
    assert_bit_identical(adapters(run.root), adapters(straight))
    assert train_losses(run.root) == train_losses(straight), f"killed after checkpoint {kill_after}"
    assert len(list_checkpoints(run)) == 2  # keep_checkpoints


def test_ctrl_c_checkpoints_prints_resume_command_and_exits_130(straight, tiny_model, tiny_data, tmp_path):
    proc = cli_train(tiny_model, tiny_data, tmp_path)
    run = wait_for_checkpoint(proc, tmp_path, 2 * SAVE_EVERY)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert f"mlxft train --resume {run.root}" in out and "Traceback" not in out
    step = int(list_checkpoints(run)[-1].name.split("-")[1])
    assert step < ITERS and (run.adapters / "adapters.safetensors").is_file()

    done = subprocess.run([sys.executable, "-m", "mlxft.cli", "train", "--resume", str(run.root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert_bit_identical(adapters(run.root), adapters(straight))
    with pytest.raises(MlxftError, match="already finished"):
        resume(run.root, log=lambda *_: None)


def test_resume_without_checkpoint_is_one_clear_line(straight, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((straight / "config.json").read_text())
    out = subprocess.run([sys.executable, "-m", "mlxft.cli", "train", "--resume", str(bare)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no checkpoint" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
