"""Preference tuning (DPO, ORPO) on a tiny random model: losses, margins, memory, bad data, resume."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from click.testing import CliRunner

from mlxft.config import DataConfig, LoraConfig, ModelConfig, PreferenceConfig, Recipe, TrainConfig
from mlxft.errors import DataError
from mlxft.recipes import load_recipe
from mlxft.data.pairs import encode_pairs, split_pair
from mlxft.training.preference import pair_logps, preference_loss
from mlxft.training.setup import train

from conftest import LABELS, SYSTEM, write_tokenizer

QUIET = dict(log=lambda *_: None)


def _pair_rows(rng: random.Random, n: int, seen: set) -> list[dict]:
    """Prompt: a label word plus noise; chosen repeats the label, rejected names another label."""
    rows = []
    while len(rows) < n:
        label = rng.choice(LABELS)
        prompt = f"{label} " + " ".join(rng.choice("xyzw") for _ in range(rng.randint(2, 7)))
        if prompt in seen:
            continue
        seen.add(prompt)
        other = rng.choice([x for x in LABELS if x != label])
        rows.append({"system": SYSTEM, "prompt": prompt, "chosen": label, "rejected": other})
    return rows


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    rng, seen = random.Random(1), set()
    out = tmp_path_factory.mktemp("pairs")
    for split, n in (("train", 48), ("valid", 8), ("test", 8)):
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pair_rows(rng, n, seen)))
    return out


def pref_recipe(model_dir, data_dir, method="dpo", pref: PreferenceConfig | None = None, **train_kw) -> Recipe:
    t = dict(learning_rate=5e-3, lr_schedule="constant", warmup_steps=0, iters=20, batch_size=4, max_seq_length=128,
             val_every=10, val_batches=2, report_every=1, seed=0, method=method)
    t.update(train_kw)
    return Recipe(
        name=f"tiny-{method}",
        model=ModelConfig(source=str(model_dir), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], rank=4, alpha=8,
                        num_layers=2),
        train=TrainConfig(**t),
        data=DataConfig(path=str(data_dir), system_prompt=SYSTEM),
        preference=pref or PreferenceConfig(),
    )


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_margins(recipe, run) -> tuple[float, float]:
    """Mean logp(chosen) - logp(rejected) over the training pairs: base, then base + the run's adapter."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load

    model, tok = load(recipe.model.source)
    from mlxft.data.formats import load_dataset

    rows = [e.row for e in load_dataset(recipe.data.path).splits["train"]]
    pairs = encode_pairs(tok, rows, SYSTEM, recipe.train.max_seq_length)
    before = pair_logps(model, "llama", pairs, 8)
    load_adapters(model, str(run / "adapters"))
    after = pair_logps(model, "llama", pairs, 8)
    return float((before[:, 0] - before[:, 1]).mean()), float((after[:, 0] - after[:, 1]).mean())


# ---------------------------------------------------------------- losses by hand


def test_dpo_sigmoid_loss_and_stats_by_hand():
    logp = mx.array([-2.0, -5.0, -4.0, -3.0])  # chosen rows, then rejected rows
    ref = mx.array([-3.0, -5.0, -3.0, -4.0])
    cfg = PreferenceConfig(beta=0.5, label_smoothing=0.1)
    loss, st = preference_loss("dpo", cfg, logp, mx.array([2.0, 2.0, 2.0, 2.0]), ref)
    margins = np.array([0.5 * ((-2 + 3) - (-4 + 3)), 0.5 * ((-5 + 5) - (-3 + 4))])  # [1.0, -0.5]
    logsig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    expected = np.mean(-0.9 * logsig(margins) - 0.1 * logsig(-margins))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert st["reward_margin"].item() == pytest.approx(margins.mean(), rel=1e-5)
    assert st["preference_accuracy"].item() == pytest.approx(0.5)
    assert st["chosen_logp"].item() == pytest.approx(-3.5) and st["rejected_logp"].item() == pytest.approx(-3.5)


def test_ipo_and_orpo_losses_by_hand():
    logp, lengths = mx.array([-2.0, -6.0]), mx.array([2.0, 3.0])
    loss, _ = preference_loss("dpo", PreferenceConfig(beta=0.25, loss="ipo"), logp, lengths, mx.array([-3.0, -3.0]))
    h = (-2 + 3) / 2 - (-6 + 3) / 3  # per-token log-ratio gap = 1.5
    assert loss.item() == pytest.approx((h - 1 / (2 * 0.25)) ** 2, rel=1e-5)
    loss, st = preference_loss("orpo", PreferenceConfig(orpo_lambda=0.5), logp, lengths)
    ac, ar = -1.0, -2.0
    log_odds = (ac - ar) - (np.log(1 - np.exp(ac)) - np.log(1 - np.exp(ar)))
    expected = 1.0 + 0.5 * np.log1p(np.exp(-log_odds))  # NLL of chosen = 2 nats / 2 tokens
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert st["preference_accuracy"].item() == 1.0 and st["reward_margin"].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- pair encoding


def test_only_the_answer_is_scored_in_a_multi_turn_pair(tiny_model):
    from mlx_lm.utils import load

    _, tok = load(str(tiny_model))
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
                        {"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
           "rejected": "bad answer"}
    prompt, chosen, rejected = split_pair(row)
    assert [m["content"] for m in prompt] == ["hi", "earlier", "q"] and chosen[0]["content"] == "good"
    (pair,) = encode_pairs(tok, [row], SYSTEM, None)
    for enc, answer in ((pair.chosen, "good"), (pair.rejected, "bad answer")):
        supervised = tok.decode(enc.ids[enc.mask].tolist())
        assert supervised == answer + "<|im_end|>", supervised  # not "earlier", not the headers


# ---------------------------------------------------------------- training


def test_dpo_step0_loss_is_log2_and_training_raises_the_margin(tiny_model, pair_data, tmp_path):
    recipe = pref_recipe(tiny_model, pair_data, "dpo", PreferenceConfig(beta=0.1), iters=40)
    res = train(recipe, runs_root=tmp_path, **QUIET)
    lines = [m for m in metrics(res.run.root) if "train_loss" in m]
    first = lines[0]
    # Step 1's loss is measured before any update: policy == reference, so the loss is log 2.
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-4)
    for key in ("reward_margin", "preference_accuracy", "chosen_logp", "rejected_logp"):
        assert all(key in m for m in lines)
    assert np.mean([m["train_loss"] for m in lines[-5:]]) < math.log(2) - 0.05
    assert np.mean([m["preference_accuracy"] for m in lines[-5:]]) > np.mean([m["preference_accuracy"] for m in lines[:5]])
    before, after = train_margins(recipe, res.run.root)
    assert after > before + 2.0, (before, after)
    vals = [m for m in metrics(res.run.root) if "val_loss" in m]
    assert vals and "val_preference_accuracy" in vals[-1] and "val_reward_margin" in vals[-1]
    cfg = json.loads((res.run.root / "config.json").read_text())
    assert cfg["recipe"]["train"]["method"] == "dpo" and cfg["preference"]["beta"] == 0.1
    assert (res.run.best_dir / "adapters.safetensors").is_file()
    # The eval: base vs adapter preference accuracy, written to eval.json as a suite.
    from mlxft.evaluation.pairs import PAIRS_SUITE, compare_pairs

    result = compare_pairs(res.run.root, pair_data / "train.jsonl", log=lambda *_: None)
    suite = json.loads((res.run.root / "eval.json").read_text())["suites"][PAIRS_SUITE]
    values = suite["scorers"][0]["values"]
    assert suite["n"] == 48 and values == result["suites"][PAIRS_SUITE]["scorers"][0]["values"]
    assert values["adapter"] > values["base"] and suite["passed"]
    # The same pairs as an eval suite (`mlxft eval RUN --suite ...`): the preference_accuracy scorer agrees.
    from mlxft.evaluation.evaluate import compare_run

    rows = [json.loads(line) for line in (pair_data / "train.jsonl").read_text().splitlines()]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": r["system"]}, {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["chosen"]}], "rejected": r["rejected"]}) + "\n" for r in rows))
    (tmp_path / "pairs.yaml").write_text("name: tiny-pairs\ndata: pairs.jsonl\nscorers:\n"
                                        "  - {name: prefers_chosen, type: preference_accuracy, gate: {min_delta: 0.01}}\n")
    evaluated = compare_run(res.run.root, [str(tmp_path / "pairs.yaml")], log=lambda *_: None)
    entry = evaluated["suites"]["tiny-pairs"]["scorers"][0]
    assert entry["values"] == pytest.approx(values) and entry["gate"]["passed"]
    assert PAIRS_SUITE in evaluated["suites"]  # eval-pairs' suite is kept beside it in eval.json


def test_orpo_raises_the_margin(tiny_model, pair_data, tmp_path):
    recipe = pref_recipe(tiny_model, pair_data, "orpo", PreferenceConfig(orpo_lambda=1.0), iters=40)
    res = train(recipe, runs_root=tmp_path, **QUIET)
    lines = [m for m in metrics(res.run.root) if "train_loss" in m]
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    before, after = train_margins(recipe, res.run.root)
    assert after > before + 1.0, (before, after)


@pytest.mark.parametrize("pref, step0", [
    (PreferenceConfig(beta=0.1, label_smoothing=0.2), math.log(2)),
    (PreferenceConfig(beta=0.25, loss="ipo"), (1 / (2 * 0.25)) ** 2),
])
def test_dpo_variants_start_where_theory_says(tiny_model, pair_data, tmp_path, pref, step0):
    res = train(pref_recipe(tiny_model, pair_data, "dpo", pref, iters=3, val_every=3), runs_root=tmp_path, **QUIET)
    first = next(m for m in metrics(res.run.root) if "train_loss" in m)
    assert first["train_loss"] == pytest.approx(step0, abs=1e-3)
    assert math.isfinite(res.final_train_loss)


def _weight_heavy_model(out):
    """Weights dominate memory (wide layers, short rows), so two copies of them would show."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out.mkdir(parents=True)
    vocab = write_tokenizer(out)
    config = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": vocab,
              "rope_theta": 10000.0, "tie_word_embeddings": True, "eos_token_id": vocab - 1,
              "max_position_embeddings": 512}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out, sum(v.nbytes for v in weights.values())


def test_dpo_memory_stays_below_two_copies_of_the_base(tmp_path):
    model_dir, weight_bytes = _weight_heavy_model(tmp_path / "wide")
    data = tmp_path / "short"  # short rows: activations stay small next to the weights
    data.mkdir()
    for split, letters in (("train", "abcdefgh"), ("valid", "ij")):
        rows = [{"prompt": f"{c}?", "chosen": c, "rejected": "z"} for c in letters]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = pref_recipe(model_dir, data, "dpo", iters=3, val_every=3, batch_size=2, val_batches=1)
    recipe.data.system_prompt = None
    import gc

    gc.collect()
    mx.clear_cache()
    held = mx.get_active_memory()  # arrays other tests in this process still hold count toward any peak
    res = train(recipe, runs_root=tmp_path / "runs", **QUIET)
    peak = res.peak_memory_gb * 1e9 - held
    # The reference is the same weights with no adapter: one copy + LoRA, optimizer and activations.
    # A second copy of the base for the reference would alone bring the peak to 2x the weights.
    assert weight_bytes < peak < 2 * weight_bytes, (peak, weight_bytes)


def test_resume_continues_a_dpo_run_exactly(tiny_model, pair_data, tmp_path):
    from mlxft.training.setup import resume

    recipe = pref_recipe(tiny_model, pair_data, "dpo", iters=8, save_every=4, keep_checkpoints=3, val_every=4)
    res = train(recipe, runs_root=tmp_path, **QUIET)
    straight = (res.run.adapters / "adapters.safetensors").read_bytes()
    # Pretend the run died after step 4: drop what came later and resume from the step-4 checkpoint.
    shutil.rmtree(res.run.checkpoint(8))
    (res.run.adapters / "adapters.safetensors").unlink()
    resumed = resume(res.run.root, **QUIET)
    assert resumed.steps == 8
    assert (res.run.adapters / "adapters.safetensors").read_bytes() == straight
    events = [m.get("event") for m in metrics(res.run.root)]
    assert "resumed" in events
    assert [m["step"] for m in metrics(res.run.root) if "train_loss" in m] == list(range(1, 9))


def test_cli_method_flag_trains_dpo(tiny_model, pair_data, tmp_path):
    from mlxft.cli import main

    recipe = tmp_path / "tiny-pref.yaml"
    recipe.write_text(
        f"name: tiny-pref\nmodel: {{source: '{tiny_model}', family: llama}}\n"
        "lora: {targets: [self_attn.q_proj], rank: 4, alpha: 8, num_layers: 2}\n"
        "train: {iters: 2, batch_size: 4, max_seq_length: 128, val_every: 2, report_every: 1}\n"
        f"data: {{path: '{pair_data}', system_prompt: '{SYSTEM}'}}\n"
    )
    result = CliRunner().invoke(main, ["train", str(recipe), "--method", "orpo", "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "r").iterdir()
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["recipe"]["train"]["method"] == "orpo"
    assert "preference_accuracy" in metrics(run)[0]


# ---------------------------------------------------------------- bad data


def _write(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
    return path


def test_chosen_equal_to_rejected_is_a_line_numbered_error(tiny_model, tmp_path):
    from mlxft.cli import main

    rng = random.Random(2)
    rows = {"train": _pair_rows(rng, 6, set()), "valid": _pair_rows(rng, 2, set())}
    rows["train"][3]["rejected"] = rows["train"][3]["chosen"]
    rows["train"][4]["rejected"] = ""
    rows["train"][5]["rejected"] = [{"role": "user", "content": "not an answer"}]
    data = _write(tmp_path / "bad", rows)
    result = CliRunner().invoke(main, ["data", "check", str(data), "--model", str(tiny_model)])
    assert result.exit_code == 1
    out = result.output
    assert "train.jsonl:4: error: chosen and rejected are the same answer" in out
    assert "train.jsonl:5: error:" in out and "train.jsonl:6: error: rejected must be an assistant answer" in out
    assert "Traceback" not in out


def test_dpo_refuses_chat_rows_and_bad_pairs_before_loading(tiny_model, tiny_data, pair_data, tmp_path):
    with pytest.raises(DataError, match=r"train.jsonl:1: train.method=dpo trains on preference pairs"):
        train(pref_recipe(tiny_model, tiny_data, "dpo"), runs_root=tmp_path, **QUIET)
    rng = random.Random(3)
    rows = {"train": _pair_rows(rng, 6, set()), "valid": _pair_rows(rng, 2, set())}
    rows["train"][1]["chosen"] = rows["train"][1]["rejected"]
    data = _write(tmp_path / "same", rows)
    with pytest.raises(DataError, match=r"train.jsonl:2: error: chosen and rejected are the same answer"):
        train(pref_recipe(tiny_model, data, "orpo"), runs_root=tmp_path, **QUIET)
    assert not any((tmp_path / "runs").glob("*")) if (tmp_path / "runs").exists() else True


# ---------------------------------------------------------------- the demo: data, recipes, suite


@pytest.mark.parametrize("name, method", [("house-style-dpo", "dpo"), ("house-style-orpo", "orpo")])
def test_house_style_recipes_train_on_the_pairs(name, method):
    from mlxft.recipes import load_recipe

    recipe = load_recipe(name, tier=16)
    assert recipe.train.method == method and recipe.data.path == "datasets/house-style"
    assert recipe.lora.dropout == 0.0  # DPO's step-0 policy must equal the reference


def test_house_style_data_is_reproducible_clean_and_held_out(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import re

    import yaml

    from mlxft.data.check import check_path

    root = Path(__file__).resolve().parents[2] / "datasets" / "house-style"
    subprocess.run([sys.executable, str(root / "generate.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "suite.jsonl"):
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name
    report = check_path(root)
    assert report.ok, report.errors[:3]
    rows = {s: [json.loads(line) for line in (root / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "test")}
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
    # The suite's style scorer tells the two styles apart on every pair.
    suite = yaml.safe_load((root.parent.parent / "evals" / "house-style.yaml").read_text())
    (style,) = [s for s in suite["scorers"] if s["name"] == "house_style"]
    pattern = re.compile(style["pattern"], re.I)
    for r in rows["train"] + rows["test"]:
        assert pattern.fullmatch(r["chosen"]) and not pattern.fullmatch(r["rejected"])


# ---------------------------------------------------------------- data-parallel (the loop owns it)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_two_ranks_of_batch_b_match_one_rank_of_batch_2b(tiny_model, pair_data, tmp_path, method):
    """DPO/ORPO run data-parallel through the same loop as SFT: 2 ranks x 4 pairs on loopback take
    the step 1 process takes with 8 pairs. DPO's loss is a mean over pairs (each rank's slice weighs
    its pairs); ORPO's SFT term is token-weighted over the whole batch's chosen answers, which each
    rank divides by (its pair share of them), so both agree with one process to float rounding:
    the first step within 1e-5, ten steps within 5e-3 relative (rounding grows, as for SFT)."""
    import subprocess
    import sys

    from test_distributed import LAUNCH, env, free_port_pair, only_run

    iters = 10
    recipe = tmp_path / "tiny-pref.yaml"
    recipe.write_text(
        f"name: tiny-pref\nmodel: {{source: '{tiny_model}', family: llama}}\n"
        "lora: {targets: [self_attn.q_proj, self_attn.v_proj, mlp.down_proj], rank: 4, alpha: 8, num_layers: 2}\n"
        f"train: {{iters: {iters}, batch_size: 8, max_seq_length: 128, val_every: 5, val_batches: 1, report_every: 1,\n"
        f"         learning_rate: 1.0e-3, lr_schedule: constant, warmup_steps: 0, method: {method}, save_every: 0}}\n"
        f"data: {{path: '{pair_data}', system_prompt: '{SYSTEM}'}}\n"
    )
    one = train(load_recipe(str(recipe), tier=8), runs_root=tmp_path / "one", **QUIET).run.root
    runs = tmp_path / "two"
    cmd = [str(LAUNCH), "--backend", "ring", "-n", "2", f"--starting-port={free_port_pair()}", "--",
           sys.executable, "-m", "mlxft.cli", "train", str(recipe), "--tier", "8", "--runs-dir", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env())
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    two = only_run(runs)
    assert json.loads((two / "config.json").read_text())["ranks"] == 2
    a = [(m["step"], m["train_loss"]) for m in metrics(one) if "train_loss" in m]
    b = [(m["step"], m["train_loss"]) for m in metrics(two) if "train_loss" in m]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, iters + 1))
    assert abs(a[0][1] - b[0][1]) <= 1e-5 * abs(a[0][1]), (a[0], b[0])
    for (step, x), (_, y) in zip(a, b):
        assert abs(x - y) <= 5e-3 * abs(x), f"step {step}: one rank {x}, two ranks {y}"
    for key in ("preference_accuracy", "reward_margin"):
        assert [m[key] for m in metrics(two) if key in m]  # the statistics come through the all-reduce
    wa = mx.load(str(one / "adapters" / "adapters.safetensors"))
    wb = mx.load(str(two / "adapters" / "adapters.safetensors"))
    assert max(mx.abs(wa[k] - wb[k]).max().item() for k in wa) < 5e-3
