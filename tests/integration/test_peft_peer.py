"""bench/peft_peer.py, the HF PEFT training peer: same batches, masks and counts as mlxft's loop.

The fast tests need no torch. The slow one trains 3 steps on the tiny llama with torch + peft
(the `bench` extra) and is skipped where they are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlxft.data.encode import encode_rows, load_splits, load_tokenizer
from mlxft.recipes import load_recipe
from mlxft.training.sft import collate

from conftest import SYSTEM

PEER = Path(__file__).resolve().parents[2] / "bench" / "peft_peer.py"


def _peer():
    spec = importlib.util.spec_from_file_location("peft_peer", PEER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(tiny_model, tiny_data):
    tokenizer, _ = load_tokenizer(str(tiny_model))
    return encode_rows(tokenizer, load_splits(tiny_data, ("train",))["train"], SYSTEM, 96)


def test_padded_batch_equals_mlxft_collate(tiny_model, tiny_data):
    peer = _peer()
    rows = _rows(tiny_model, tiny_data)
    batch = sorted(rows[:8], key=lambda e: -len(e.ids))  # different lengths: real padding
    assert len(batch[0].ids) > len(batch[-1].ids)
    # a row cut by max_length inside its answer keeps the answer tokens left before the cut
    tokenizer, first = load_tokenizer(str(tiny_model))[0], load_splits(tiny_data, ("train",))["train"][:1]
    cut_at = int(np.flatnonzero(encode_rows(tokenizer, first, SYSTEM, None)[0].mask)[1]) + 1
    batch.append(encode_rows(tokenizer, first, SYSTEM, cut_at)[0])
    assert batch[-1].mask.sum() == 2
    got = peer.pad_batch(batch)
    inputs, targets, idx, n_tokens, n_sup = collate(batch)
    inputs, targets, idx = np.array(inputs), np.array(targets), np.array(idx)
    assert np.array_equal(got["input_ids"], inputs)
    supervised = np.zeros(inputs.size, dtype=bool)
    supervised[idx] = True
    supervised = supervised.reshape(inputs.shape)
    assert np.array_equal(got["labels"] != -100, supervised)
    assert np.array_equal(got["labels"][supervised], targets[supervised])
    assert got["tokens"] == n_tokens and got["supervised_tokens"] == n_sup > 0
    assert got["attention_mask"].sum(axis=1).tolist() == [len(e.ids) - 1 for e in batch]


def _two_prompt_data(tiny_data: Path, out: Path) -> Path:
    """tiny_data with a second system prompt on every third training row (two prefix groups)."""
    out.mkdir()
    rows = [json.loads(x) for x in (tiny_data / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:
            row["messages"][0]["content"] = "Mark the message."  # about as long: lengths do not sort the groups apart
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "valid.jsonl").write_text((tiny_data / "valid.jsonl").read_text())
    return out


def test_peer_batches_are_the_rows_mlxft_trains_on(tiny_model, tiny_data, tmp_path):
    from mlxft.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from mlxft.training.setup import train

    peer = _peer()
    data = _two_prompt_data(tiny_data, tmp_path / "data")
    recipe = Recipe(
        name="tiny", model=ModelConfig(source=str(tiny_model), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj"], rank=4, alpha=8, num_layers=1),
        train=TrainConfig(iters=12, batch_size=8, max_seq_length=96, val_every=1000, val_batches=1,
                          report_every=1, save_every=0, seed=5, group_by_prompt=True),  # 8 batches an epoch: 12 steps span two
        data=DataConfig(path=str(data), system_prompt=SYSTEM),
    )
    run = train(recipe, runs_root=tmp_path / "runs", log=lambda *_: None).run.root
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "tokens" in m]
    mlxft_counts = np.diff([[0, 0]] + [[m["tokens"], m["supervised_tokens"]] for m in steps], axis=0).tolist()

    batches = peer.mlxft_batches(tiny_model, recipe, data, 12)
    assert [[b["tokens"], b["supervised_tokens"]] for b in batches] == mlxft_counts
    # the comparison tells orders apart: mlxft's plain order (batches not grouped by prompt) is another one
    plain = peer.mlxft_batches(tiny_model, Recipe(**{**recipe.__dict__, "train": TrainConfig(
        **{**recipe.train.__dict__, "group_by_prompt": False})}), data, 12)
    assert [[b["tokens"], b["supervised_tokens"]] for b in plain] != mlxft_counts


def test_learning_rates_are_mlxft_schedule():
    peer = _peer()
    recipe = load_recipe("smollm2-135m", tier=8)
    lrs = peer.learning_rates(recipe, 12)
    assert lrs[0] == pytest.approx(recipe.train.learning_rate * 0.1)  # the recipe warms up from lr/10
    assert max(lrs) == pytest.approx(recipe.train.learning_rate, rel=1e-6)
    assert lrs[-1] < lrs[10]  # cosine decay after the 10 warm-up steps


def test_bench_says_why_peft_is_not_measured(monkeypatch):
    spec = importlib.util.spec_from_file_location("train_bench", PEER.parent / "train_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # torch and transformers present, peft missing (whatever this venv really has: CI has no torch)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else object())
    assert bench.peft_unavailable() == "peft not installed (install the bench extra: pip install -e '.[bench]')"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "peft") else object())
    assert bench.peft_unavailable().startswith("torch, peft not installed")


@pytest.mark.slow
def test_peft_peer_trains_three_steps(tiny_model, tiny_data, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    out = tmp_path / "peft.json"
    sets = [f"data.system_prompt={SYSTEM}", "train.max_seq_length=96", "lora.num_layers=1", "train.learning_rate=1e-3"]
    cmd = [sys.executable, str(PEER), "--model", str(tiny_model), "--data", str(tiny_data), "--iters", "3",
           "--window", "1", "--out", str(out)] + [x for s in sets for x in ("--set", s)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["steps_timed"] == 2 and result["seconds"] > 0
    assert result["supervised_tokens_per_sec"] > 0 and result["tokens_per_sec"] > result["supervised_tokens_per_sec"]
    assert result["peak_memory_gb"] > 0 and "resident set" in result["peak_memory_definition"]
    # LoRA on 7 targets of the last block only (rank 8): q/o 8*(64+64), k/v 8*(64+32), gate/up/down 8*(64+128)
    assert result["trainable_parameters"] == 2 * 1024 + 2 * 768 + 3 * 1536
    # The first step's loss is the base's (LoRA B starts at zero): it equals mlxft's loss on the same batch.
    peer = _peer()
    recipe = load_recipe("smollm2-135m", tier=8, overrides=sets)
    first = peer.mlxft_batches(tiny_model, recipe, tiny_data, 1)[0]
    from mlxft.models.load import load_base
    from mlxft.training.sft import make_loss

    model = load_base(str(tiny_model)).model
    labels = first["labels"]
    idx = np.flatnonzero(labels != -100).astype(np.int32)
    targets = np.where(labels == -100, 0, labels).astype(np.int32)
    mlx_loss = make_loss(model, "llama")(model, mx.array(first["input_ids"].astype(np.int32)), mx.array(targets), mx.array(idx))
    assert result["train_loss"][0] == pytest.approx(mlx_loss.item(), rel=1e-4)
    assert len(result["train_loss"]) == 3 and all(np.isfinite(result["train_loss"]))
