"""A tiny run that really learned the toy task (label + end-of-turn), trained in ~3 s.

Random weights never stop talking; this run answers a label and stops, so a teacher or
a baseline built on it produces rows that pass the data checks.
"""

from __future__ import annotations

from pathlib import Path

from conftest import SYSTEM


def train_tiny_run(model_dir: Path, data_dir: Path, runs_root: Path, iters: int = 80) -> Path:
    from mlxft.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from mlxft.training.setup import train

    recipe = Recipe(
        name="tiny",
        model=ModelConfig(source=str(model_dir), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], rank=4, alpha=8, num_layers=2),
        train=TrainConfig(learning_rate=3e-3, lr_schedule="cosine", warmup_steps=2, iters=iters, batch_size=8,
                          max_seq_length=64, val_every=40, val_batches=2, report_every=20, seed=0),
        data=DataConfig(path=str(data_dir), system_prompt=SYSTEM),
    )
    return train(recipe, runs_root=runs_root, log=lambda *_: None).run.root


def loss_curve(runs_root: Path, tiny_model: Path, tiny_data: Path, sets: list[str]) -> list[float]:
    """Train and validation losses of a 30-step default-recipe run on the tiny model (report every
    step, validate every 10): the curve the speed-path tests compare against the plain path."""
    import json

    from mlxft.recipes import load_recipe
    from mlxft.training.setup import train

    recipe = load_recipe("smollm2-135m", tier=8, overrides=[
        f"model.source={tiny_model}", "train.iters=30", "train.batch_size=4", "train.report_every=1",
        "train.val_every=10", "train.val_batches=2", "train.learning_rate=3e-3", "train.warmup_steps=0", *sets,
    ])
    res = train(recipe, tiny_data, runs_root=runs_root, log=lambda *a: None)
    lines = [json.loads(x) for x in res.run.metrics.read_text().splitlines()]
    return [m["train_loss"] for m in lines if "train_loss" in m] + [m["val_loss"] for m in lines if "val_loss" in m]


def assert_curves_match(reference: list[float], other: list[float], rtol: float = 1e-3) -> None:
    """Two loss_curve()s agree point by point within `rtol`, and the reference really moves
    (so the comparison means something)."""
    assert len(reference) == len(other) == 33  # 30 train losses + 3 validations
    assert reference[-1] < reference[0] * 0.8
    for a, b in zip(reference, other):
        assert abs(a - b) <= rtol * abs(a), (a, b)


def wait_for_checkpoint(proc, runs_dir: Path, min_step: int, timeout: float = 60):
    """Poll until a run under `runs_dir` has a checkpoint at step >= min_step (the process keeps
    training meanwhile); return its RunDir."""
    import time

    from mlxft.training.checkpoint import list_checkpoints
    from mlxft.runs.run import RunDir

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended before step {min_step}:\n{proc.stdout.read()}"
        for root in runs_dir.glob("*"):
            found = list_checkpoints(RunDir(root))
            if found and int(found[-1].name.split("-")[1]) >= min_step:
                return RunDir(root)
        time.sleep(0.005)
    raise AssertionError(f"no checkpoint at step >= {min_step} appeared within {timeout:.0f} s")
