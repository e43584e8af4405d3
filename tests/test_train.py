"""Training on a tiny random model: it learns, writes a usable run, and every method runs."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlxft.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
from mlxft.train import batch_order, collate, make_loss, train

from conftest import LABELS, SYSTEM


def tiny_recipe(model_dir, data_dir, **train_kw) -> Recipe:
    t = dict(learning_rate=3e-3, lr_schedule="cosine", warmup_steps=2, iters=30, batch_size=8,
             max_seq_length=64, val_every=15, val_batches=2, report_every=5, seed=0)
    t.update(train_kw)
    return Recipe(
        name="tiny",
        model=ModelConfig(source=str(model_dir), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], rank=4, alpha=8, num_layers=2),
        train=TrainConfig(**t),
        data=DataConfig(path=str(data_dir), system_prompt=SYSTEM),
    )


def test_lora_run_learns_and_writes_run_folder(tiny_model, tiny_data, tmp_path):
    res = train(tiny_recipe(tiny_model, tiny_data, iters=40), runs_root=tmp_path, log=lambda *_: None)
    run = res.run.root
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_losses = [m["train_loss"] for m in metrics if "train_loss" in m]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert len(val_losses) >= 2 and val_losses[-1] < val_losses[0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["system_prompt"] == SYSTEM and cfg["versions"]["mlx"]
    assert len(cfg["data"]["sha256"]["train"]) == 64
    adapter_cfg = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    # The adapter works in stock mlx-lm, with its own loader.
    from mlx_lm.utils import load

    model, _ = load(str(tiny_model), adapter_path=str(run / "adapters"))
    n_lora = sum(1 for name, _ in model.named_modules() if name.endswith("q_proj") and "lora" not in name)
    assert n_lora == 2


def test_trained_adapter_answers_the_task(tiny_model, tiny_data, tmp_path):
    from mlxft.evaluate import compare_run

    res = train(tiny_recipe(tiny_model, tiny_data, iters=80), runs_root=tmp_path, log=lambda *_: None)
    result = compare_run(res.run.root, "test", log=lambda *_: None)
    assert result["adapter"] >= 0.5 and result["adapter"] > result["base"]
    assert json.loads((res.run.root / "eval.json").read_text())["n"] == 12


@pytest.mark.parametrize("method", ["dora", "full"])
def test_other_methods_complete(tiny_model, tiny_data, tmp_path, method):
    r = tiny_recipe(tiny_model, tiny_data, iters=6, val_every=6)
    r.fine_tune_type = method
    res = train(r, runs_root=tmp_path, log=lambda *_: None)
    assert np.isfinite(res.final_train_loss)
    from mlx_lm.utils import load

    load(str(tiny_model), adapter_path=str(res.run.root / "adapters"))


def test_grad_accumulation_and_checkpointing_run(tiny_model, tiny_data, tmp_path):
    res = train(tiny_recipe(tiny_model, tiny_data, iters=4, batch_size=4, grad_accumulation=2, grad_checkpoint=True),
                runs_root=tmp_path, log=lambda *_: None)
    assert np.isfinite(res.final_train_loss)


def test_sparse_head_loss_equals_full_logits_loss(tiny_model, tiny_data):
    """Computing logits only at supervised positions must not change the loss."""
    from mlx_lm.utils import load

    from mlxft.data import encode_rows, read_chat_jsonl

    model, tok = load(str(tiny_model))
    rows = encode_rows(tok, read_chat_jsonl(tiny_data / "train.jsonl")[:8], SYSTEM, 64)
    inputs, targets, idx, _, _ = collate(rows)
    sparse = make_loss(model, "llama")(model, inputs, targets, idx)
    full = make_loss(model, "not-a-sparse-family")(model, inputs, targets, idx)
    assert abs(sparse.item() - full.item()) < 1e-5


def test_batch_order_is_deterministic_and_complete():
    lengths = np.random.default_rng(0).integers(5, 100, size=103)
    a = batch_order(lengths, 8, seed=3, epoch=0)
    b = batch_order(lengths, 8, seed=3, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == len(flat) >= 96
    assert [x.tolist() for x in batch_order(lengths, 8, 3, 1)] != [x.tolist() for x in a]
