"""Training on a tiny random model: it learns, writes a usable run, and every method runs."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlxft.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
from mlxft.training.batches import batch_order
from mlxft.training.sft import collate, make_loss
from mlxft.training.setup import train

from conftest import SYSTEM


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
    from mlxft.evaluation.evaluate import compare_run

    res = train(tiny_recipe(tiny_model, tiny_data, iters=80), runs_root=tmp_path, log=lambda *_: None)
    result = compare_run(res.run.root, log=lambda *_: None)  # no suites in the recipe: its test split
    values = result["suites"]["test"]["scorers"][0]["values"]
    assert values["adapter"] >= 0.5 and values["adapter"] > values["base"]
    assert json.loads((res.run.root / "eval.json").read_text())["suites"]["test"]["n"] == 12


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

    from mlxft.data.encode import encode_rows, read_chat_jsonl

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


# ---------------------------------------------------------------- training you can trust


def quiet(*_):
    pass


def metrics(run_root):
    return [json.loads(line) for line in (run_root / "metrics.jsonl").read_text().splitlines()]


def test_same_recipe_data_and_seed_give_the_same_loss_curve(tiny_model, tiny_data, tmp_path):
    curves = []
    for _ in range(2):
        r = tiny_recipe(tiny_model, tiny_data, iters=12, report_every=2, val_every=6)
        r.lora.dropout = 0.1  # the dropout masks must repeat too
        run = train(r, runs_root=tmp_path, log=quiet).run.root
        curves.append([(m["step"], m.get("train_loss"), m.get("val_loss")) for m in metrics(run) if "event" not in m])
    assert curves[0] == curves[1] and len(curves[0]) == 8
    cfg = json.loads((run / "config.json").read_text())
    assert set(cfg["versions"]) >= {"mlx", "mlx-lm", "numpy", "python"} and set(cfg["data"]["sha256"]) == {"train", "valid"}


def test_epochs_set_the_step_count_and_walk_the_data_order(tiny_model, tiny_data, tmp_path):
    r = tiny_recipe(tiny_model, tiny_data, iters=None, epochs=2, save_every=0, val_every=100)
    res = train(r, runs_root=tmp_path, log=quiet)
    assert res.steps == 2 * (64 // 8)  # 64 rows, batch 8
    state = json.loads((res.run.root / "checkpoints" / "step-000016" / "state.json").read_text())
    assert (state["epoch"], state["position"], state["stop_reason"]) == (2, 0, "done")


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_schedules_warm_up_then_follow_their_shape(tiny_model, tiny_data, schedule):
    from mlxft.training.adapters import build_schedule

    lr = 1e-3
    sched = build_schedule(tiny_recipe(tiny_model, tiny_data, learning_rate=lr, lr_schedule=schedule, warmup_steps=10), 110)
    at = lambda step: sched(mx.array(step)).item()  # noqa: E731
    assert at(0) == pytest.approx(0.1 * lr) and at(5) == pytest.approx(0.55 * lr) and at(10) == pytest.approx(lr)
    end = {"constant": lr, "linear": 0.1 * lr, "cosine": 0.1 * lr}[schedule]
    assert at(110) == pytest.approx(end, rel=1e-4)
    if schedule == "cosine":  # cosine stays high longer than linear, then falls
        assert at(35) > 0.8 * lr


def test_grad_checkpointing_does_not_leak_into_later_models(tiny_model, tiny_data, tmp_path):
    from mlx_lm.models import llama

    before = llama.TransformerBlock.__call__
    train(tiny_recipe(tiny_model, tiny_data, iters=2, grad_checkpoint=True), runs_root=tmp_path, log=quiet)
    assert llama.TransformerBlock.__call__ is before


def test_checkpoints_are_complete_pruned_and_skip_half_written_ones(tiny_model, tiny_data, tmp_path):
    from mlxft.training.checkpoint import latest_checkpoint, list_checkpoints
    from mlxft.runs.run import RunDir

    res = train(tiny_recipe(tiny_model, tiny_data, iters=12, save_every=3, keep_checkpoints=2), runs_root=tmp_path, log=quiet)
    run = RunDir(res.run.root)
    assert [p.name for p in list_checkpoints(run)] == ["step-000009", "step-000012"]
    for ckpt in list_checkpoints(run):
        assert {p.name for p in ckpt.iterdir()} == {"adapters.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json"}
    (run.checkpoints / ".tmp-step-000015-999").mkdir()  # what a writer killed mid-save leaves
    assert latest_checkpoint(run).name == "step-000012"


def poison_loss_at(monkeypatch, step: int):
    """Make the training loss NaN on the `step`-th training forward pass (validation untouched)."""
    import mlxft.training.fast.paths as paths_module
    import mlxft.training.sft as sft_module

    real = sft_module.make_loss
    calls = {"n": 0}

    def make_poisoned(model, family):
        loss_fn = real(model, family)

        def poisoned(model, *args):
            loss = loss_fn(model, *args)
            if model.training:
                calls["n"] += 1
                if calls["n"] == step:
                    return loss * float("nan")
            return loss

        return poisoned

    monkeypatch.setattr(sft_module, "make_loss", make_poisoned)
    monkeypatch.setattr(paths_module, "supports_shared_prefix", lambda *a: False)  # poison the plain forward


def test_nan_loss_stops_with_one_message_and_keeps_the_last_good_checkpoint(tiny_model, tiny_data, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlxft.cli import main
    from mlxft.training.setup import resume

    poison_loss_at(monkeypatch, 13)
    out = CliRunner().invoke(main, ["train", "smollm2-135m", "--tier", "8", "--data", str(tiny_data), "--runs-dir", str(tmp_path),
                                    "--model", str(tiny_model), "--set", "train.iters=20", "--set", "train.save_every=5",
                                    "--set", "lora.num_layers=2", "--set", "train.batch_size=8"])
    assert out.exit_code == 1
    error = [line for line in out.output.splitlines() if line.startswith("mlxft: error:")]
    assert len(error) == 1 and "diverged at step 13" in error[0] and "Traceback" not in out.output
    from mlxft.recipes import load_recipe

    lower = f"train.learning_rate={load_recipe('smollm2-135m').train.learning_rate / 5:.2g}"
    for hint in (lower, "train.max_grad_norm", "train.jsonl", "fp16", "step-000010"):
        assert hint in error[0]
    run = next(tmp_path.iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000005", "step-000010"]
    assert not (run / "adapters" / "adapters.safetensors").exists()  # the poisoned weights were never written
    saved = mx.load(str(run / "checkpoints" / "step-000010" / "adapters.safetensors"))
    assert all(mx.isfinite(v).all().item() for v in saved.values())
    monkeypatch.undo()
    res = resume(run, log=quiet)  # the kept checkpoint is usable: training completes from it
    assert res.steps == 20 and np.isfinite(res.final_train_loss)


@pytest.fixture(scope="module")
def memorisable_data(tmp_path_factory):
    """Answers are random strings: the model can only memorise train rows, so validation loss soon rises."""
    import random

    rng = random.Random(1)
    out = tmp_path_factory.mktemp("memorise")
    for split, n in (("train", 8), ("valid", 16)):
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                msg = " ".join(rng.choice("xyzw") for _ in range(4))
                answer = "".join(rng.choice("abcdefgh") for _ in range(8))
                messages = [{"role": "user", "content": msg}, {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": messages}) + "\n")
    return out


def test_early_stopping_ends_an_overfitting_run_and_keeps_the_best_adapter(tiny_model, memorisable_data, tmp_path, capsys):
    from mlx_lm.utils import load

    from mlxft.data.encode import encode_rows, read_chat_jsonl
    from mlxft.runs.run import RunDir
    from mlxft.training.sft import SFT, PlainForward

    r = tiny_recipe(tiny_model, memorisable_data, iters=300, learning_rate=2e-3, lr_schedule="constant", warmup_steps=0,
                    batch_size=4, val_every=5, val_batches=-1, save_every=0, early_stopping_patience=3)
    r.lora.rank = 16
    res = train(r, runs_root=tmp_path, log=quiet)
    assert res.stopped_early and res.steps < 100
    records = metrics(res.run.root)
    val = {m["step"]: m["val_loss"] for m in records if "val_loss" in m}
    best_step = min(val, key=val.get)
    assert 5 < best_step < res.steps and res.best_step == best_step
    assert any(m.get("event") == "overfitting" for m in records)
    captured = capsys.readouterr()
    assert "memorising" in captured.out + captured.err
    assert any(m.get("event") == "early_stop" for m in records)
    run = RunDir(res.run.root)
    cfg = run.read_config()
    assert cfg["best"]["step"] == best_step and run.best_adapters == run.best_dir
    # Stock mlx-lm loads best/, and it scores exactly the lowest validation loss seen.
    model, tok = load(str(tiny_model), adapter_path=str(run.best_dir))
    rows = encode_rows(tok, read_chat_jsonl(memorisable_data / "valid.jsonl"), SYSTEM, 64)
    validation = SFT(r, rows, rows)
    validation.forward = PlainForward(model, "llama")
    sums, weight = validation.validation_sums(model, rows, 4)
    loss = sums["loss"] / weight
    assert loss == pytest.approx(val[best_step], abs=1e-5)


def test_qlora_on_a_quantized_base_trains_only_lora_weights(tiny_model, tiny_data, tmp_path, monkeypatch):
    import mlx.nn as nn

    import mlxft.training.setup as setup_module
    from mlxft.models.load import load_base

    def load_quantized(source, quantize, training=True, **kwargs):
        # mlxft dequantizes on CPU by design (its quantized matmul is slow); the test forces a 4-bit base.
        base = load_base(source, quantize, training, **kwargs)
        nn.quantize(base.model, group_size=32, bits=4)
        return base

    monkeypatch.setattr(setup_module, "load_base", load_quantized)
    res = train(tiny_recipe(tiny_model, tiny_data, iters=6, val_every=6), runs_root=tmp_path, log=quiet)
    assert np.isfinite(res.final_train_loss)
    keys = list(mx.load(str(res.run.root / "adapters" / "adapters.safetensors")))
    assert keys and all(k.endswith(("lora_a", "lora_b")) for k in keys)


def test_train_refuses_data_with_errors(tiny_model, tiny_data, tmp_path):
    """The same check as `mlxft data check` runs first: leakage between splits is an error."""
    import shutil

    from mlxft.errors import DataError

    bad = tmp_path / "leaky"
    shutil.copytree(tiny_data, bad)
    first = (bad / "train.jsonl").read_text().splitlines()[0]
    with open(bad / "valid.jsonl", "a") as f:
        f.write(first + "\n")
    with pytest.raises(DataError, match="valid"):
        train(tiny_recipe(tiny_model, bad, iters=2), runs_root=tmp_path / "runs", log=lambda *_: None)
    assert not (tmp_path / "runs").exists()
