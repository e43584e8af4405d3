"""`mlxft plan`: predicted peak memory within 15% of measured, refusal and --auto-fit."""

from __future__ import annotations

import dataclasses
import gc
import json
import random

import pytest

import mlxft  # noqa: F401
import mlx.core as mx
from mlx.utils import tree_flatten

from conftest import LABELS, SYSTEM, write_tokenizer
from mlxft.training import plan as planner
from mlxft.errors import ConfigError
from mlxft.recipes import load_recipe

TOLERANCE = 0.15
ALL = '["self_attn.q_proj","self_attn.k_proj","self_attn.v_proj","self_attn.o_proj","mlp.gate_proj","mlp.up_proj","mlp.down_proj"]'


def _model(root, name, hidden, inter, layers, heads, kv):
    from mlx_lm.models import llama

    out = root / name
    out.mkdir()
    cfg = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv, "rms_norm_eps": 1e-5,
           "vocab_size": write_tokenizer(out), "rope_theta": 10000.0, "tie_word_embeddings": True,
           "max_position_embeddings": 4096}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _data(root, name, words):
    """Rows of (nearly) one length, so every batch is the longest one."""
    rng = random.Random(0)
    out = root / name
    out.mkdir()
    for split, n in (("train", 16), ("valid", 8)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = rng.choice(LABELS)
                text = f"{label} {split}{i:02d} " + " ".join(rng.choice("xyzw") for _ in range(words))
                row = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                       {"role": "assistant", "content": label}]
                f.write(json.dumps({"messages": row}) + "\n")
    return out


def _run_peak(run) -> float:
    """The run's own peak: what it reports minus what the test process already held (other tests'
    fixtures and caches would otherwise count, ~40 MB in the full suite)."""
    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory()
    return run().peak_memory_gb * 1e9 - held


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    return {
        "d256": _model(root, "d256", 256, 768, 3, 4, 2),
        "d384": _model(root, "d384", 384, 1024, 2, 6, 2),
        "short": _data(root, "short", 60),
        "long": _data(root, "long", 200),
    }


CASES = [  # (model, data, overrides): LoRA with/without the shared prefix, checkpointing, rank, targets, batch
    ("d256", "short", ["train.batch_size=8", "lora.num_layers=3"]),
    ("d256", "long", ["train.batch_size=8", "lora.num_layers=3"]),
    ("d256", "long", ["train.batch_size=4", "lora.num_layers=2", "lora.rank=16", f"lora.targets={ALL}", "train.shared_prefix=false"]),
    ("d384", "long", ["train.batch_size=8", "lora.num_layers=2"]),
    ("d384", "short", ["train.batch_size=8", "lora.num_layers=2", "train.grad_checkpoint=true"]),
]


@pytest.mark.parametrize("model,data,overrides", CASES)
def test_predicted_peak_memory_within_15_percent(shapes, tmp_path, model, data, overrides):
    from mlxft.training.setup import train

    sets = [f"model.source={shapes[model]}", "train.iters=2", "train.val_every=1000", "train.val_batches=1",
            "train.max_seq_length=1024", "train.save_every=0", *overrides]
    recipe = load_recipe("smollm2-135m", tier=8, overrides=sets)
    plan = planner.plan_recipe(recipe, shapes[data], measure_speed=False)
    measured = _run_peak(lambda: train(recipe, shapes[data], runs_root=tmp_path, log=lambda *a: None))
    ratio = plan.peak_bytes / measured
    print(f"\n{model} {data} {overrides}: predicted {plan.peak_bytes / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB, {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, f"predicted {plan.peak_bytes / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB"


def _long_rows(root, name, words):
    """Rows of ~`words` prompt tokens and a ~100-token answer, for batch-1 long-context runs."""
    rng = random.Random(1)
    out = root / name
    out.mkdir()
    for split, n in (("train", 2), ("valid", 1)):
        with open(out / f"{split}.jsonl", "w") as f:
            for i in range(n):
                text = " ".join(rng.choice("xyzw") for _ in range(words))
                answer = " ".join(rng.choice(LABELS) for _ in range(30))
                f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return out


@pytest.mark.parametrize("checkpoint", [False, True])
def test_long_rows_predicted_within_15_percent_at_three_lengths(tmp_path_factory, checkpoint):
    """Batch 1 at 1536, 2048 and 3072 tokens (the chunked attention runs at all three; with
    checkpointing, by blocks): the plan's peak within 15% of one training step's, every length."""
    from mlxft.training.setup import train

    root = tmp_path_factory.mktemp("long")
    model = _model(root, "d256x4", 256, 768, 4, 8, 2)
    for length in (1536, 2048, 3072):
        data = _long_rows(root, f"rows{length}", (length - 200) // 2)  # ~2 tokens a word: rows just under the length
        recipe = load_recipe("smollm2-135m", tier=8, overrides=[
            f"model.source={model}", "train.iters=1", "train.val_every=1000", "train.val_batches=1", "train.save_every=0",
            "train.batch_size=1", "lora.num_layers=-1", f"train.max_seq_length={length}", "data.system_prompt=null",
            f"train.grad_checkpoint={'true' if checkpoint else 'false'}"])
        plan = planner.plan_recipe(recipe, data, measure_speed=False)
        measured = _run_peak(lambda: train(recipe, data, runs_root=root / "runs", log=lambda *a: None))
        ratio = plan.peak_bytes / measured
        print(f"\nd256x4 {length} tokens, checkpointing {checkpoint}: predicted {plan.peak_bytes / 1e6:.1f} MB, "
              f"measured {measured / 1e6:.1f} MB, {ratio:.3f}")
        assert abs(ratio - 1) <= TOLERANCE, f"{length}: predicted {plan.peak_bytes / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB"


def test_known_shapes_plan_without_weights():
    """Hub recipes plan from their published shapes; bigger models need more than smaller ones."""
    sizes = {}
    for name in ("llama3-1b", "llama3-8b", "qwen3-30b-a3b"):
        recipe = load_recipe(name, tier=16)
        shape = planner.shape_of(recipe.model.source)
        batch = planner.Batch(recipe.train.batch_size, recipe.train.max_seq_length, 0, 8)
        sizes[name] = planner.predict(recipe, shape, batch, "metal", 16 << 30)
    assert sizes["llama3-1b"].weight_bytes < sizes["llama3-8b"].weight_bytes < sizes["qwen3-30b-a3b"].weight_bytes
    assert 3.5e9 < sizes["llama3-8b"].weight_bytes < 6e9  # 8B at 4 bits (+ scales): ~4.5 GB


def test_train_refuses_a_run_that_does_not_fit_and_auto_fit_shrinks_it(shapes, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlxft.cli import main

    recipe = load_recipe("smollm2-135m", tier=8, overrides=[f"model.source={shapes['d256']}", "train.batch_size=8",
                                                            "lora.num_layers=3", "train.max_seq_length=1024"])
    full = planner.plan_recipe(recipe, shapes["long"], measure_speed=False).peak_bytes
    monkeypatch.setattr(planner, "budget_for", lambda r: int(full * 0.75 / planner.HEADROOM))
    args = ["train", "smollm2-135m", "--tier", "8", "--model", str(shapes["d256"]), "--data", str(shapes["long"]),
            "--runs-dir", str(tmp_path), "--set", "train.batch_size=8", "--set", "lora.num_layers=3",
            "--set", "train.iters=2", "--set", "train.val_every=1000", "--set", "train.val_batches=1",
            "--set", "train.max_seq_length=1024"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 1
    assert "train.batch_size" in out.output and "--auto-fit" in out.output and "Traceback" not in out.output
    assert not any(tmp_path.iterdir())  # refused before anything was written

    out = CliRunner().invoke(main, args + ["--auto-fit"])
    assert out.exit_code == 0, out.output
    assert "auto-fit:" in out.output and "train.batch_size=4 with train.grad_accumulation=2" in out.output
    (run,) = tmp_path.iterdir()
    train_cfg = json.loads((run / "config.json").read_text())["recipe"]["train"]
    assert (train_cfg["batch_size"], train_cfg["grad_accumulation"]) == (4, 2)


def test_auto_fit_order_batch_then_checkpointing_then_quantize(shapes, monkeypatch):
    recipe = load_recipe("smollm2-135m", tier=8, overrides=[f"model.source={shapes['d384']}", "train.batch_size=4"])
    tiny = 1_000_000  # nothing fits: every lever is pulled in order, then it says so
    plan, changes = planner.auto_fit(recipe, shapes["long"], budget_bytes=tiny, backend="metal")
    assert changes == ["train.batch_size=2 with train.grad_accumulation=2", "train.batch_size=1 with train.grad_accumulation=4",
                       "train.grad_checkpoint=true", "quantize=4 (QLoRA on a 4-bit base)"]
    assert not plan.fits
    monkeypatch.setattr(planner, "budget_for", lambda r: tiny)
    again = load_recipe("smollm2-135m", tier=8, overrides=[f"model.source={shapes['d384']}"])
    with pytest.raises(ConfigError, match="could not make it fit"):
        planner.check_fits(again, shapes["long"], True, print)


REAL = [  # the default recipe on its own data, and two levers a user pulls
    [],
    ["train.grad_checkpoint=true"],
    ["lora.num_layers=4", "train.batch_size=4"],
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", REAL)
def test_real_model_predicted_peak_within_15_percent(tmp_path, overrides):
    """SmolLM2-135M on the recipe's data: one step on the plan's longest batch, measured vs predicted."""
    from mlxft.data.encode import load_splits
    from mlxft.recipes import resolve_data_dir
    from mlxft.training.setup import train

    recipe = load_recipe("smollm2-135m", tier=8, overrides=overrides)
    source = resolve_data_dir(recipe.data.path)
    batch = max(planner.epoch_batches(recipe, source)[0], key=lambda b: b.padded)  # the first of equals
    assert len(batch.indices) == batch.rows
    rows = load_splits(source, ("train",))["train"]
    data = tmp_path / "worst"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in batch.indices))
    (data / "valid.jsonl").write_text((source / "valid.jsonl").read_text())
    recipe = load_recipe("smollm2-135m", tier=8, overrides=overrides + [
        "train.iters=1", "train.val_every=1000", "train.val_batches=1", "train.save_every=0"])
    plan = planner.plan_recipe(recipe, data, measure_speed=False)
    assert (plan.notes[0].split(": ")[1]) == f"{batch.rows} x {batch.suffix} tokens" + planner.prefix_note(batch)  # the same batch
    measured = _run_peak(lambda: train(recipe, data, runs_root=tmp_path / "runs", log=lambda *a: None))
    ratio = plan.peak_bytes / measured
    print(f"\nSmolLM2 {overrides}: predicted {plan.peak_bytes / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB, {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, f"predicted {plan.peak_bytes / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB"


@pytest.mark.slow
def test_real_model_batch_under_two_system_prompts_predicted_within_15_percent(tmp_path):
    """The longest batch that runs as a group per system prompt (task rows + replay rows): one step,
    measured vs predicted (the plan sums the groups' activations)."""
    from mlxft.data.encode import load_splits
    from mlxft.recipes import resolve_data_dir
    from mlxft.training.setup import train

    recipe = load_recipe("smollm2-135m", tier=8)
    source = resolve_data_dir(recipe.data.path)
    batches, _ = planner.epoch_batches(recipe, source)
    batch = max((b for b in batches if b.prefixes > 1), key=lambda b: b.padded)
    rows = load_splits(source, ("train",))["train"]
    data = tmp_path / "grouped"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in batch.indices))
    (data / "valid.jsonl").write_text((source / "valid.jsonl").read_text())
    recipe = load_recipe("smollm2-135m", tier=8, overrides=[
        "train.iters=1", "train.val_every=1000", "train.val_batches=1", "train.save_every=0"])
    plan = planner.plan_recipe(recipe, data, measure_speed=False)
    (again,), _ = planner.epoch_batches(recipe, data)
    assert again == dataclasses.replace(batch, indices=again.indices)  # the same groups
    measured = _run_peak(lambda: train(recipe, data, runs_root=tmp_path / "runs", log=lambda *a: None))
    ratio = plan.peak_bytes / measured
    print(f"\nSmolLM2 grouped batch {batch}: predicted "
          f"{plan.peak_bytes / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB, {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, f"predicted {plan.peak_bytes / 1e6:.1f} MB vs measured {measured / 1e6:.1f} MB"
