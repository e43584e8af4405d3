"""The real bundled model: a short fine-tune whose adapter stock mlx-lm loads and uses."""

import json
import subprocess
import sys

import pytest

from mlxft.recipes import load_recipe
from mlxft.training.setup import train

pytestmark = pytest.mark.slow

LABELS = {"feat", "fix", "docs", "refactor", "test", "perf", "build", "ci", "chore", "style"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    recipe = load_recipe(
        "smollm2-135m",
        overrides=["train.iters=24", "train.batch_size=4", "train.val_every=24", "train.val_batches=2", "train.warmup_steps=4"],
    )
    return train(recipe, runs_root=tmp_path_factory.mktemp("runs"), log=lambda *_: None)


def test_short_finetune_learns_the_label_format(short_run):
    metrics = [json.loads(l) for l in short_run.run.metrics.read_text().splitlines()]
    losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    assert losses[-1] < losses[0] / 2
    cfg = json.loads(short_run.run.config.read_text())
    assert cfg["base_model"]["precision"] == "float32"  # CPU: dequantized base


def test_adapter_works_in_stock_mlx_lm_generate(short_run):
    cfg = json.loads(short_run.run.config.read_text())
    out = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "generate", "--model", cfg["base_model"]["path"],
         "--adapter-path", str(short_run.run.adapters), "--system-prompt", cfg["system_prompt"],
         "--prompt", "Fix crash when the config file is empty", "--max-tokens", "5", "--temp", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    answer = out.stdout.split("==========")[1].strip()
    assert answer in LABELS, out.stdout


def test_mlxft_generate_uses_the_run_system_prompt(short_run):
    from mlxft.inference.generate import Sampling, generate_text, load_target

    loaded = load_target(str(short_run.run.root))
    assert loaded.system_prompt.startswith("Classify the git commit message")
    import io

    text = generate_text(loaded, "Add a --verbose flag to the CLI", loaded.system_prompt, Sampling(max_tokens=5), out=io.StringIO())
    assert text.strip() in LABELS
