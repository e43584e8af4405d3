"""A tiny run that really learned the toy task (label + end-of-turn), trained in ~3 s.

Random weights never stop talking; this run answers a label and stops, so a teacher or
a baseline built on it produces rows that pass the data checks.
"""

from __future__ import annotations

from pathlib import Path

from conftest import SYSTEM


def train_tiny_run(model_dir: Path, data_dir: Path, runs_root: Path, iters: int = 80) -> Path:
    from mlxft.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from mlxft.train import train

    recipe = Recipe(
        name="tiny",
        model=ModelConfig(source=str(model_dir), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], rank=4, alpha=8, num_layers=2),
        train=TrainConfig(learning_rate=3e-3, lr_schedule="cosine", warmup_steps=2, iters=iters, batch_size=8,
                          max_seq_length=64, val_every=40, val_batches=2, report_every=20, seed=0),
        data=DataConfig(path=str(data_dir), system_prompt=SYSTEM),
    )
    return train(recipe, runs_root=runs_root, log=lambda *_: None).run.root
