"""GRPO (mlxft/training/grpo.py): advantages and both losses against hand calculations, KL 0 and the
REINFORCE gradient at step 0, a tiny model learning a toy reward, a failing reward contained,
and kill + resume giving the bit-identical adapter."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxft.config import DataConfig, GrpoConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
from mlxft.errors import ConfigError
from mlxft.training.grpo import adapters_off, group_advantages, grpo_loss, token_logps
from mlxft.training.setup import resume, train

from conftest import SYSTEM

QUIET = dict(log=lambda *_: None)

TOY_REWARD = '''
def letters(completion, example):
    """The toy reward: the share of the reply's characters that are lowercase letters a-z (dense
    enough for a random tiny model, whose byte-level tokens are letters about a fifth of the time)."""
    return sum("a" <= ch <= "z" for ch in completion) / max(len(completion), 1)


CALLS = [0]


def broken(completion, example):
    """Every third call raises, every third returns a non-number, the rest 0.5."""
    CALLS[0] += 1
    if CALLS[0] % 3 == 0:
        raise RuntimeError("a bug in the user's reward")
    return "not a number" if CALLS[0] % 3 == 1 else 0.5
'''


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    """Prompt-only rows in both accepted shapes: {"prompt", "reference"} (train) and chat rows ending
    with a user turn (valid); one format per file."""
    rng = random.Random(3)
    out = tmp_path_factory.mktemp("prompts")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    for split, n in (("train", 24), ("valid", 4)):
        rows = []
        for i in range(n):
            text = " ".join(rng.choice(words) for _ in range(3)) + f" {split}{i}"
            rows.append({"prompt": text, "reference": "alpha"} if split == "train" else
                        {"messages": [{"role": "user", "content": text}], "reference": "alpha"})
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "toy_reward.py").write_text(TOY_REWARD)
    return out


def grpo_recipe(model_dir, data_dir, **grpo_kw) -> Recipe:
    grpo = dict(num_generations=4, max_completion_length=8, temperature=1.0, beta=0.04,
                reward_functions=[f"{data_dir}/toy_reward.py:letters"])
    grpo.update(grpo_kw)
    return Recipe(
        name="tiny-grpo",
        model=ModelConfig(source=str(model_dir), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"], rank=8, alpha=16,
                        num_layers=2),
        train=TrainConfig(learning_rate=2e-2, lr_schedule="constant", warmup_steps=0, iters=6, batch_size=2,
                          max_seq_length=128, val_every=6, val_batches=1, report_every=1, seed=0, method="grpo"),
        data=DataConfig(path=str(data_dir), system_prompt=SYSTEM),
        grpo=GrpoConfig(**grpo),
    )


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- the math, by hand


def test_group_advantages_equal_a_hand_calculation():
    r = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])
    a = group_advantages(r, 4, "grpo")
    mean, std = 0.5, math.sqrt(((0.5 ** 2) * 2) / 3)  # the first group: unbiased std
    assert a[:4] == pytest.approx([(1 - mean) / (std + 1e-4), (0 - mean) / (std + 1e-4), 0, 0], abs=1e-9)
    assert np.all(a[4:] == 0)  # equal rewards: no signal
    assert group_advantages(r, 4, "dr_grpo")[:4] == pytest.approx([0.5, -0.5, 0, 0])


def test_both_loss_variants_equal_a_hand_calculation():
    logp = mx.array([-1.0, -2.0, -0.5, -3.0, -1.5])  # completion 0: 2 tokens, completion 1: 3 tokens
    ref = mx.array([-1.2, -2.0, -0.4, -3.0, -1.0])
    seq = mx.array([0, 0, 1, 1, 1])
    adv = mx.array([1.0, 1.0, -0.5, -0.5, -0.5])
    beta, eps = 0.1, 0.2
    kl = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    per = [-a + beta * k for a, k in zip(adv.tolist(), kl)]  # ratio 1: the clip never binds
    loss, stats = grpo_loss(logp, logp, ref, adv, seq, 2, eps, beta, "grpo", 8)
    assert loss.item() == pytest.approx(((per[0] + per[1]) / 2 + (per[2] + per[3] + per[4]) / 3) / 2, rel=1e-6)
    assert stats["kl"].item() == pytest.approx(((kl[0] + kl[1]) / 2 + sum(kl[2:]) / 3) / 2, rel=1e-6)
    assert stats["clip_fraction"].item() == 0
    dr, _ = grpo_loss(logp, logp, ref, adv, seq, 2, eps, beta, "dr_grpo", 8)
    assert dr.item() == pytest.approx(sum(per) / (2 * 8), rel=1e-6)
    # Off-policy tokens: the ratio is clipped where the advantage would push it further.
    old = logp - mx.array([0.5, 0.0, 0.0, 0.0, -0.5])  # ratios e^0.5 and e^-0.5 on tokens 0 and 4
    clipped, s = grpo_loss(logp, old, ref, adv, seq, 2, eps, 0.0, "dr_grpo", 8)
    expected = [-min(math.exp(0.5) * 1.0, 1.2 * 1.0), -1.0, 0.5, 0.5, -min(math.exp(-0.5) * -0.5, 0.8 * -0.5)]
    assert clipped.item() == pytest.approx(sum(expected) / 16, rel=1e-6)
    assert s["clip_fraction"].item() == pytest.approx(2 / 5)


def test_kl_is_zero_and_the_gradient_is_reinforce_at_step_zero(tiny_model):
    """A fresh LoRA (B = 0) is its base: KL 0, and the loss gradient is -mean_i (1/|o_i|) sum_t A_i grad logp."""
    from mlx_lm.utils import load

    from mlxft.training.adapters import attach_adapters

    model, _ = load(str(tiny_model))
    attach_adapters(model, grpo_recipe(tiny_model, "unused"))  # fresh LoRA: B = 0
    rng = np.random.default_rng(0)
    inputs = mx.array(rng.integers(0, 200, (2, 6)).astype(np.int32))
    targets = mx.array(rng.integers(0, 200, (2, 6)).astype(np.int32))
    idx = mx.array(np.array([3, 4, 5, 6 + 2, 6 + 3, 6 + 4, 6 + 5], np.int32))
    seq, adv = mx.array([0, 0, 0, 1, 1, 1, 1]), mx.array([0.7] * 3 + [-1.3] * 4)
    with adapters_off(model):
        ref = mx.stop_gradient(token_logps(model, inputs, targets, idx, True))
    logp = token_logps(model, inputs, targets, idx, True)
    _, stats = grpo_loss(logp, logp, ref, adv, seq, 2, 0.2, 0.04, "grpo", 8)
    assert stats["kl"].item() == 0  # the step-0 policy is its reference

    def loss(m):
        logp = token_logps(m, inputs, targets, idx, True)
        return grpo_loss(logp, mx.stop_gradient(logp), ref, adv, seq, 2, 0.2, 0.04, "grpo", 8)[0]

    def reinforce(m):  # -mean over completions of A_i x mean over its tokens of logp
        logp = token_logps(m, inputs, targets, idx, True)
        weights = mx.array([0.7 / 3] * 3 + [-1.3 / 4] * 4)
        return -(weights * logp).sum() / 2

    got = dict(tree_flatten(nn.value_and_grad(model, loss)(model)[1]))
    want = dict(tree_flatten(nn.value_and_grad(model, reinforce)(model)[1]))
    assert set(got) == set(want)
    for k in got:
        assert mx.allclose(got[k], want[k], atol=1e-6).item(), k


# ---------------------------------------------------------------- runs on the tiny model


def test_a_tiny_model_raises_a_toy_reward(tiny_model, prompt_data, tmp_path):
    recipe = grpo_recipe(tiny_model, prompt_data, num_generations=6, max_completion_length=6)
    recipe.train.iters, recipe.train.val_every, recipe.train.learning_rate = 12, 12, 1e-2
    res = train(recipe, runs_root=tmp_path, **QUIET)
    rows = [m for m in metrics(res.run.root) if "reward" in m and "train_loss" in m]
    assert [m["step"] for m in rows] == list(range(1, 13))
    for key in ("reward_std", "kl", "completion_length", "clip_fraction", "no_signal",
                "reward/toy_reward.letters"):
        assert key in rows[0], key
    first, last = np.mean([m["reward"] for m in rows[:4]]), np.mean([m["reward"] for m in rows[-4:]])
    assert last > first + 0.05, [round(m["reward"], 3) for m in rows]  # measured 0.16 -> 0.26
    cfg = json.loads((res.run.root / "config.json").read_text())
    assert cfg["recipe"]["train"]["method"] == "grpo" and cfg["grpo"]["rewards_used"][0]["weight"] == 1.0
    val = [m for m in metrics(res.run.root) if "val_loss" in m]
    assert val and val[-1]["val_loss"] == pytest.approx(-val[-1]["val_reward"])  # best = highest validation reward
    from mlxft.runs.report import write_report

    html = Path(write_report(res.run.root)).read_text()
    assert "GRPO: rewards and KL" in html and html.count("data:image/png;base64,") >= 5


def test_a_reward_that_raises_is_contained_and_counted(tiny_model, prompt_data, tmp_path):
    recipe = grpo_recipe(tiny_model, prompt_data, reward_functions=[f"{prompt_data}/toy_reward.py:broken"])
    recipe.train.iters = 3
    res = train(recipe, runs_root=tmp_path, **QUIET)
    rows = [m for m in metrics(res.run.root) if "train_loss" in m]
    # 3 steps x 2 prompts x 4 completions = 24 calls: 16 failed (raised or not a number), each scored 0
    assert sum(m["reward_errors"] for m in rows) == 16 and all(np.isfinite(m["train_loss"]) for m in rows)
    with pytest.raises(ConfigError, match="no function nope"):
        train(grpo_recipe(tiny_model, prompt_data, reward_functions=[f"{prompt_data}/toy_reward.py:nope"]),
              runs_root=tmp_path / "x", **QUIET)


def test_kill_and_resume_gives_the_bit_identical_adapter(tiny_model, prompt_data, tmp_path):
    recipe = grpo_recipe(tiny_model, prompt_data)
    recipe.train.iters, recipe.train.save_every, recipe.train.keep_checkpoints = 6, 3, 3
    res = train(recipe, runs_root=tmp_path, **QUIET)
    straight = (res.run.adapters / "adapters.safetensors").read_bytes()
    shutil.rmtree(res.run.checkpoint(6))  # as if killed after the step-3 checkpoint
    (res.run.adapters / "adapters.safetensors").unlink()
    resumed = resume(res.run.root, **QUIET)
    assert resumed.steps == 6
    assert (res.run.adapters / "adapters.safetensors").read_bytes() == straight
    rows = [m for m in metrics(res.run.root) if "train_loss" in m]
    assert [m["step"] for m in rows] == list(range(1, 7))


def test_grpo_refuses_a_reward_it_cannot_build(tiny_model, prompt_data, tmp_path):
    with pytest.raises(ConfigError, match="grpo.rewards"):
        train(grpo_recipe(tiny_model, prompt_data, rewards=["no_such_scorer"], reward_functions=[]),
              runs_root=tmp_path, **QUIET)
    with pytest.raises(ConfigError, match="at least one reward"):
        train(grpo_recipe(tiny_model, prompt_data, reward_functions=[]), runs_root=tmp_path, **QUIET)


def test_the_shared_prompt_forward_gives_the_full_row_log_probs(tiny_model, prompt_data):
    """A group's completions share their prompt, run once per group (grouped_hidden): the completion
    tokens' log-probs and their gradients equal the full rows' (fp rounding aside)."""
    from mlx_lm.utils import load

    from mlxft.inference.batch import Completion
    from mlxft.training.adapters import attach_adapters
    from mlxft.training.fast.paths import speed_paths
    from mlxft.training.grpo import GRPO, Prompt

    recipe = grpo_recipe(tiny_model, prompt_data)
    model, tok = load(str(tiny_model))
    attach_adapters(model, recipe)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    rng = np.random.default_rng(1)
    items = [Prompt(None, [1] + rng.integers(3, 200, n).tolist(), f"p{n}") for n in (9, 14)]
    done = [Completion("", rng.integers(3, 200, k).tolist(), True) for k in (3, 7, 5, 2)]
    obj = GRPO(recipe, items, [], None, tok)
    obj.cfg.num_generations = 2
    paths = speed_paths(recipe, model)
    assert paths.shared_prefix
    results = {}
    for name in ("shared", "full"):
        obj.attach(model, paths)
        if name == "full":
            obj.frozen = None
        rollout = obj.rollout(items, done, np.array([1.0, -1.0, 0.5, -0.5]))
        assert (rollout.prefixes is not None) == (name == "shared")
        logps = obj.logps(model, rollout)
        grads = nn.value_and_grad(model, lambda m: obj.logps(m, rollout).sum())(model)[1]
        results[name] = (logps, dict(tree_flatten(grads)))
    assert results["shared"][0].shape == (17,)
    assert mx.allclose(results["shared"][0], results["full"][0], atol=1e-5).item()
    for k, v in results["full"][1].items():
        assert mx.allclose(results["shared"][1][k], v, atol=1e-5).item(), k
