"""Tests for mlxft.recipes: every bundled recipe loads on every tier, overrides, errors, tiers."""

import json

import pytest

import mlxft  # noqa: F401  (loads the fast BLAS before mlx)
from mlxft import recipes
from mlxft.config import MEMORY_TIERS, Recipe, TierConfig
from mlxft.errors import ConfigError
from mlxft.recipes import (
    detect_tier,
    family_module_keys,
    list_recipes,
    load_recipe,
    recipe_path,
)

GIB = 1024**3
COMMIT_TYPE_PROMPT = (
    "Classify the git commit message. Reply with exactly one label: "
    "feat, fix, docs, refactor, test, perf, build, ci, chore or style."
)
REQUIRED_RECIPES = {
    "smollm2-135m", "llama3-1b", "llama3-3b", "llama3-8b", "qwen2.5-0.5b", "qwen2.5-7b",
    "qwen3-4b", "mistral-7b", "gemma3-1b", "phi-3.5-mini", "qwen3-30b-a3b",
    "gemma3-270m",  # the second real (installable) family
}


def write_recipe(tmp_path, text, name="custom.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the bundled recipes --------------------------------------------------------------


def test_required_recipes_are_bundled():
    assert REQUIRED_RECIPES <= set(list_recipes())


@pytest.mark.parametrize("name", list_recipes())
def test_every_recipe_loads_for_every_tier(name):
    for tier in MEMORY_TIERS:
        recipe = load_recipe(name, tier=tier)
        assert recipe.tier == tier
        assert recipe.name == name
        assert set(recipe.tiers) == set(MEMORY_TIERS), "every tier is spelled out"
        settings = recipe.tiers[tier]
        assert recipe.train.batch_size == settings.batch_size
        assert recipe.train.grad_accumulation == settings.grad_accumulation
        assert recipe.train.grad_checkpoint == settings.grad_checkpoint
        assert recipe.train.max_seq_length == settings.max_seq_length
        if settings.quantize is not None:
            assert recipe.quantize == settings.quantize
    # Every target exists in a tiny instance of the recipe's model family.
    assert set(recipe.lora.targets) <= family_module_keys(recipe.model.family)


@pytest.mark.parametrize("name", list_recipes())
def test_recipe_file_opens_with_its_launch_command(name):
    first_line = recipe_path(name).read_text().splitlines()[0]
    assert first_line.startswith(f"# make finetune RECIPE={name} ")
    assert f"mlxft train {name}" in first_line


@pytest.mark.parametrize("name", list_recipes())
def test_recipes_demo_the_commit_type_task(name):
    recipe = load_recipe(name, tier=16)
    if recipe.train.method != "sft":
        pytest.skip("not an SFT recipe: DPO/ORPO demo on datasets/house-style, GRPO on datasets/structured")
    if recipe.data.path == "datasets/structured":
        pytest.skip("the structured-output demo (evals/structured-output.yaml; tests/evaluation/test_evaluate.py)")
    # the default trains on commit-type plus replay rows that keep general ability and safety
    assert recipe.data.path == ("datasets/commit-type-replay" if name == "smollm2-135m" else "datasets/commit-type")
    assert recipe.data.system_prompt == COMMIT_TYPE_PROMPT
    assert recipe.eval.max_tokens == 8


def test_default_recipe_keeps_its_cpu_tuned_values():
    for tier in MEMORY_TIERS:
        recipe = load_recipe("smollm2-135m", tier=tier)
        assert recipe.model.source == "builtin:smollm2-135m-instruct"
        assert recipe.model.family == "llama"
        assert recipe.fine_tune_type == "lora"
        assert recipe.lora.targets == [
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        ]
        assert (recipe.lora.rank, recipe.lora.alpha, recipe.lora.dropout) == (8, 16.0, 0.0)
        assert recipe.lora.num_layers == 16
        train = recipe.train
        assert (train.learning_rate, train.lr_schedule, train.warmup_steps) == (1.0e-4, "cosine", 10)
        assert (train.iters, train.batch_size, train.grad_accumulation) == (120, 8, 1)
        assert (train.grad_checkpoint, train.max_seq_length) == (False, 256)
        assert (train.val_every, train.val_batches, train.report_every, train.seed) == (40, 4, 10, 0)
        assert not recipe.quantize  # 135M fits anywhere in full precision


def test_two_real_families_adapt_every_linear_layer_of_their_blocks():
    """The two recipes whose base installs from PyPI: different families, each fully targeted."""
    recipes = {name: load_recipe(name, tier=16) for name in ("smollm2-135m", "gemma3-270m")}
    assert {name: r.model.family for name, r in recipes.items()} == {
        "smollm2-135m": "llama", "gemma3-270m": "gemma3_text"}
    assert recipes["gemma3-270m"].model.source == "builtin:gemma3-270m"
    for recipe in recipes.values():
        assert set(recipe.lora.targets) == family_module_keys(recipe.model.family)


def test_moe_recipe_adapts_experts_but_not_the_router():
    recipe = load_recipe("qwen3-30b-a3b", tier=64)
    keys = family_module_keys("qwen3_moe")
    assert "mlp.gate" in keys  # the router exists and could be targeted...
    assert "mlp.gate" not in recipe.lora.targets  # ...but deliberately is not
    assert {"mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"} <= set(
        recipe.lora.targets
    )


def test_recipe_to_dict_is_json_ready_and_reads_back():
    recipe = load_recipe("llama3-3b", tier=8)
    data = json.loads(json.dumps(recipe.to_dict()))
    assert data["tier"] == 8
    assert data["train"]["batch_size"] == recipe.train.batch_size
    assert data["lora"]["targets"] == recipe.lora.targets
    assert data["tiers"]["8"]["quantize"] == 4
    assert Recipe.from_dict(data) == recipe  # what a run records is what a resume trains with


# --- finding recipes --------------------------------------------------------------------


def test_unknown_recipe_name_lists_the_available_ones():
    with pytest.raises(ConfigError) as error:
        recipe_path("llama9-1t")
    assert "llama9-1t" in str(error.value)
    assert "smollm2-135m" in str(error.value)


def test_recipe_path_accepts_a_yaml_path(tmp_path):
    path = write_recipe(tmp_path, "name: mine\n")
    assert recipe_path(str(path)) == path
    recipe = load_recipe(path, tier=8)
    assert recipe.name == "mine"
    assert recipe.tier == 8


def test_missing_recipe_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        recipe_path(tmp_path / "nope.yaml")


# --- overrides ----------------------------------------------------------------------------


def test_dotted_overrides_win_over_file_and_tier():
    recipe = load_recipe(
        "smollm2-135m",
        tier=8,
        overrides=[
            "train.iters=600",
            "lora.rank=16",
            "lora.alpha=32",  # an int is fine for a float field
            "train.learning_rate=1e-4",  # YAML 1.1 reads this as a string; still a float
            "train.batch_size=2",  # beats the tier's batch_size
            "train.grad_checkpoint=true",
            "quantize=4",
            "data.system_prompt=Reply: yes",  # a str field keeps the raw text
            "lora.targets=[self_attn.q_proj, self_attn.v_proj]",
        ],
    )
    assert recipe.train.iters == 600
    assert recipe.lora.rank == 16
    assert recipe.lora.alpha == 32.0 and isinstance(recipe.lora.alpha, float)
    assert recipe.train.learning_rate == 1e-4
    assert recipe.train.batch_size == 2
    assert recipe.train.grad_checkpoint is True
    assert recipe.quantize == 4
    assert recipe.data.system_prompt == "Reply: yes"
    assert recipe.lora.targets == ["self_attn.q_proj", "self_attn.v_proj"]


def test_null_override_clears_an_optional_field():
    recipe = load_recipe("smollm2-135m", tier=8, overrides=["train.iters=null", "train.epochs=2"])
    assert recipe.train.iters is None
    assert recipe.train.epochs == 2.0


def test_bad_overrides_are_all_reported_at_once():
    with pytest.raises(ConfigError) as error:
        load_recipe(
            "smollm2-135m",
            tier=8,
            overrides=[
                "train.iters=abc",
                "train.iter=5",
                "lora.rank=true",
                "novalue",
                "train.lr_schedule=cosin",
                "lora.targets=[mlp.gate]",
            ],
        )
    message = str(error.value)
    assert "train.iters: expected int or null, got str 'abc'" in message
    assert "train.iter: unknown key; did you mean 'train.iters'?" in message
    assert "lora.rank: expected int, got bool True" in message  # bool is not an int
    assert "--set novalue: expected key=value" in message
    assert "train.lr_schedule: 'cosin' is not valid" in message
    assert "'mlp.gate' is not a LoRA-able module of a llama block" in message


# --- validation of recipe files -----------------------------------------------------------

BAD_RECIPE = """\
name: broken
model: {source: builtin:smollm2-135m-instruct, family: llama}
fine_tune_type: qlora
lora:
  targets: [self_attn.q_proj, self_attn.qkv_proj]
  rnak: 8
train:
  batch_size: "eight"
  lr_schedule: cosine
tiers:
  12: {batch_size: 2}
  8: {batch_size: 2, learning_rate: 1.0}
"""


def test_bad_recipe_reports_every_problem_with_file_and_key(tmp_path):
    path = write_recipe(tmp_path, BAD_RECIPE, "broken.yaml")
    with pytest.raises(ConfigError) as error:
        load_recipe(path, tier=8)
    message = str(error.value)
    assert str(path) in message
    for expected in [
        "lora.rnak: unknown key; did you mean 'lora.rank'?",
        "train.batch_size: expected int, got str 'eight'",
        "fine_tune_type: 'qlora' is not valid; expected one of lora, dora, full",
        "'self_attn.qkv_proj' is not a LoRA-able module of a llama block",
        "tiers.12: bad tier",
        "tiers.8.learning_rate: unknown key",
    ]:
        assert expected in message
    assert "6 problem(s)" in message


def test_invalid_yaml_reports_the_line(tmp_path):
    path = write_recipe(tmp_path, "name: x\nlora:\n  rank: [8\n")
    with pytest.raises(ConfigError) as error:
        load_recipe(path, tier=8)
    assert str(path) in str(error.value)
    assert "line 4" in str(error.value) and "invalid YAML" in str(error.value)


def test_unknown_family_is_a_config_error(tmp_path):
    path = write_recipe(tmp_path, "model: {family: not_a_model}\n")
    with pytest.raises(ConfigError, match="Unknown model family 'not_a_model'"):
        load_recipe(path, tier=8)


def test_family_mlx_lm_remaps_points_at_the_real_module(tmp_path):
    path = write_recipe(tmp_path, "model: {family: mistral}\n")
    with pytest.raises(ConfigError, match="use family: llama"):
        load_recipe(path, tier=8)


def test_dora_on_expert_stacks_is_refused(tmp_path):
    path = write_recipe(
        tmp_path,
        "model: {family: qwen3_moe}\nfine_tune_type: dora\nlora: {targets: [mlp.switch_mlp.up_proj]}\n",
    )
    with pytest.raises(ConfigError, match="no DoRA"):
        load_recipe(path, tier=8)


def test_full_fine_tune_ignores_lora_targets(tmp_path):
    path = write_recipe(tmp_path, "fine_tune_type: full\nlora: {targets: [not.a_layer]}\n")
    assert load_recipe(path, tier=8).fine_tune_type == "full"


def test_tier_values_apply_only_where_set(tmp_path):
    path = write_recipe(
        tmp_path, "train: {batch_size: 8, max_seq_length: 512}\ntiers:\n  8: {batch_size: 2}\n"
    )
    recipe = load_recipe(path, tier=8)
    assert recipe.train.batch_size == 2
    assert recipe.train.max_seq_length == 512
    assert recipe.tiers[8] == TierConfig(batch_size=2)
    assert load_recipe(path, tier=16).train.batch_size == 8  # no tier 16 entry: file value


def test_explicit_tier_must_be_a_memory_tier():
    with pytest.raises(ConfigError, match="bad tier"):
        load_recipe("smollm2-135m", tier=12)


# --- memory tiers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "memory, tier",
    [
        (16 * GIB, 16),
        (5 * GIB, 8),  # below the smallest tier still gets the smallest
        (200 * GIB, 128),
        (24 * GIB, 24),
        (int(15.6 * GIB), 16),  # a "16 GB" Linux box after the kernel's share
        (int(10.7 * GIB), 8),  # a 16 GB Mac's Metal working set
        (int(48 * GIB), 48),
    ],
)
def test_detect_tier_from_bytes(memory, tier):
    assert detect_tier(memory) == tier


def test_tier_defaults_to_detected_memory(monkeypatch):
    monkeypatch.setattr(recipes, "usable_memory_bytes", lambda: 33 * GIB)
    assert load_recipe("smollm2-135m").tier == 32


def test_usable_memory_is_positive():
    assert recipes.usable_memory_bytes() > 0
