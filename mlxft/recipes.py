"""Recipes: find `recipes/<name>.yaml`, pick a memory tier, and resolve a checked `Recipe`.

Values merge as dataclass defaults < the YAML file < the tier's overrides (the file's
`tiers:` mapping) < `--set key=value` overrides. Every problem found on the way is
collected and raised as one `ConfigError`, one line per problem naming where it came
from (the file or the --set item) and the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import importlib.util
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import yaml

from mlxft.config import (
    DPO_LOSSES, FINE_TUNE_TYPES, GRPO_LOSSES, LR_SCHEDULES, MEMORY_TIERS, TRAIN_METHODS, Recipe, TierConfig,
)
from mlxft.errors import ConfigError

RECIPES_DIR = Path(__file__).parent.parent / "recipes"

# Bits mlx.nn.quantize accepts; 0 (or null) keeps the source precision.
QUANTIZE_BITS = (0, 2, 3, 4, 5, 6, 8)

# TierConfig field -> the recipe key it replaces when not None.
TIER_TARGETS = {
    "batch_size": "train.batch_size",
    "grad_accumulation": "train.grad_accumulation",
    "grad_checkpoint": "train.grad_checkpoint",
    "max_seq_length": "train.max_seq_length",
    "quantize": "quantize",
}

# Value rules beyond the type: dotted key -> (test, what a good value is).
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "fine_tune_type": (lambda v: v in FINE_TUNE_TYPES, f"one of {', '.join(FINE_TUNE_TYPES)}"),
    "train.lr_schedule": (lambda v: v in LR_SCHEDULES, f"one of {', '.join(LR_SCHEDULES)}"),
    "quantize": (lambda v: v is None or v in QUANTIZE_BITS, "null/0 (keep) or 2, 3, 4, 5, 6, 8"),
    "lora.rank": (lambda v: v > 0, "a positive int"),
    "lora.num_layers": (lambda v: v == -1 or v > 0, "-1 (all blocks) or a positive count"),
    "train.learning_rate": (lambda v: v > 0, "a positive number"),
    "train.iters": (lambda v: v is None or v > 0, "null or a positive int"),
    "train.epochs": (lambda v: v is None or v > 0, "null or a positive number"),
    "train.batch_size": (lambda v: v > 0, "a positive int"),
    "train.grad_accumulation": (lambda v: v > 0, "a positive int"),
    "train.max_seq_length": (lambda v: v > 0, "a positive int"),
    "train.method": (lambda v: v in TRAIN_METHODS, f"one of {', '.join(TRAIN_METHODS)}"),
    "preference.beta": (lambda v: v > 0, "a positive number"),
    "preference.label_smoothing": (lambda v: 0 <= v < 0.5, "a number in [0, 0.5)"),
    "preference.loss": (lambda v: v in DPO_LOSSES, f"one of {', '.join(DPO_LOSSES)}"),
    "preference.orpo_lambda": (lambda v: v >= 0, "a number >= 0"),
    "grpo.num_generations": (lambda v: v >= 2, "an int >= 2 (a group needs two completions to compare)"),
    "grpo.max_completion_length": (lambda v: v > 0, "a positive int"),
    "grpo.temperature": (lambda v: v > 0, "a positive number (sampling; 0 would make every completion equal)"),
    "grpo.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "grpo.beta": (lambda v: v >= 0, "a number >= 0"),
    "grpo.epsilon": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "grpo.loss": (lambda v: v in GRPO_LOSSES, f"one of {', '.join(GRPO_LOSSES)}"),
}

# PyYAML (YAML 1.1) reads `2e-4` as a string; only `2.0e-4` is a float. Accept both.
_EXPONENT_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")

# Tiny ModelArgs for checking LoRA targets: fields most mlx-lm families share, plus a
# few family-specific extras. ModelArgs.from_dict drops the fields a family lacks.
_TINY_ARGS = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "rms_norm_eps": 1e-5, "layer_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": True,
    "attention_bias": False, "mlp_bias": False, "partial_rotary_factor": 1.0,
    # Mixture-of-experts families: few experts, every block sparse.
    "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
}
_TINY_EXTRAS = {
    "qwen2_moe": {"shared_expert_intermediate_size": 32},
    "gpt_neox": {"rotary_emb_base": 10000, "rotary_pct": 1.0, "layer_norm_eps": 1e-5},
    "stablelm": {"use_qkv_bias": False},
}


def list_recipes() -> list[str]:
    """Names of the bundled recipes (file stems in `recipes/`), sorted."""
    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file for a recipe name ("llama3-3b") or a path to a .yaml file."""
    return named_yaml(name_or_path, RECIPES_DIR, list_recipes, "Recipe file not found", "Unknown recipe")


def named_yaml(name_or_path: str | Path, folder: Path, names, missing_file: str, unknown: str) -> Path:
    """`folder/<name>.yaml` for a name, or the given .yaml path; ConfigError naming the closest
    match (`names()` lists them) when there is none."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{missing_file}: {path}")
        return path
    path = folder / f"{text}.yaml"
    if not path.is_file():
        known = names()
        close = difflib.get_close_matches(text, known, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{unknown} '{text}'.{hint} Available: {', '.join(known)}")
    return path


def usable_memory_bytes() -> int:
    """Memory a training run can use: the Metal GPU working-set limit on a Mac, else total RAM."""
    import mlx.core as mx  # lazy: loading a recipe stays free of mlx until memory is asked about

    if mx.metal.is_available():
        info = mx.device_info(mx.gpu) if hasattr(mx, "device_info") else mx.metal.device_info()
        if limit := info.get("max_recommended_working_set_size"):
            return int(limit)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def detect_tier(memory_bytes: int | None = None) -> int:
    """The largest tier in MEMORY_TIERS at or below the usable memory in GB (at least 8).

    GB here is 10**9 bytes: a "16 GB" Linux box reports ~15.6 GiB after the kernel's
    share, which is still 16.7 GB, so it lands on tier 16 as its owner expects.
    """
    if memory_bytes is None:
        memory_bytes = usable_memory_bytes()
    gigabytes = memory_bytes / 1e9
    fitting = [tier for tier in MEMORY_TIERS if tier <= gigabytes]
    return fitting[-1] if fitting else MEMORY_TIERS[0]


def load_recipe(
    name_or_path: str | Path, tier: int | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """Resolve a recipe: defaults < YAML file < tier overrides < `--set` overrides.

    `tier` None picks `detect_tier()`; `overrides` are dotted "key=value" strings such
    as "train.iters=600". Raises one ConfigError listing every problem found.
    """
    path = recipe_path(name_or_path)
    where = str(path)
    problems: list[str] = []
    origins: dict[str, tuple[str, str]] = {}  # dotted key -> (where, key as written)
    recipe = Recipe(name=path.stem)

    raw = _read_yaml(path, problems)
    raw_tiers = raw.pop("tiers", None)
    _fill(recipe, raw, "", where, problems, origins)
    recipe.tiers = _parse_tiers(raw_tiers, where, problems)
    recipe.tier = _choose_tier(tier, problems)
    _apply_tier(recipe, where, origins)
    for item in overrides:
        _apply_override(recipe, item, problems, origins)
    _check_values(recipe, where, problems, origins)
    _check_targets(recipe, problems, origins)

    if problems:
        unique = list(dict.fromkeys(problems))
        listing = "\n".join(f"  - {problem}" for problem in unique)
        raise ConfigError(f"Recipe {where} has {len(unique)} problem(s):\n{listing}")
    return recipe


def resolve_data_dir(path: str | Path) -> Path:
    """A relative data path is tried from the working directory, then from the mlxft checkout."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = RECIPES_DIR.parent / p
    return alt if alt.exists() else p


def family_module_keys(family: str) -> set[str]:
    """LoRA-able module keys inside a transformer block of an mlx-lm model family.

    Keys are those `linear_to_lora_layers` can convert ("self_attn.q_proj",
    "mlp.switch_mlp.gate_proj", "mlp.gate"), read from a tiny random-weight instance.
    """
    return set(_family_lora_modules(family))


@functools.lru_cache(maxsize=None)
def _family_lora_modules(family: str) -> dict[str, str]:
    """Module key -> layer class name for every LoRA-able module in the family's blocks."""
    # lazy: loading a recipe (mlxft runs, plan, studio) stays free of mlx-lm until a family is checked
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
    from mlx_lm.utils import MODEL_REMAPPING

    if family in MODEL_REMAPPING:
        raise ConfigError(
            f"mlx-lm loads model_type '{family}' with its '{MODEL_REMAPPING[family]}' module; "
            f"use family: {MODEL_REMAPPING[family]}"
        )
    module = None
    if re.fullmatch(r"[A-Za-z0-9_\-]+", family):
        if importlib.util.find_spec(f"mlx_lm.models.{family}") is not None:
            module = importlib.import_module(f"mlx_lm.models.{family}")
    if module is None or not hasattr(module, "Model"):
        raise ConfigError(
            f"Unknown model family '{family}': no mlx_lm.models.{family} model "
            "(family is the model_type in the model's config.json)"
        )
    args = {"model_type": family, **_TINY_ARGS, **_TINY_EXTRAS.get(family, {})}
    args["text_config"] = dict(args)  # vision-language wrappers (gemma3, mistral3) nest LM args
    try:
        model = module.Model(module.ModelArgs.from_dict(args))
    except Exception as error:  # each family fails its own way (TypeError, KeyError, ...)
        raise ConfigError(
            f"Cannot build a tiny '{family}' model to check LoRA targets ({error}); "
            "add the fields it needs to _TINY_EXTRAS in mlxft/recipes.py"
        ) from error

    lora_types = (
        nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear,
        nn.Embedding, nn.QuantizedEmbedding,
    )
    modules = {}
    for layer in model.layers:
        for key, submodule in layer.named_modules():
            if key and (isinstance(submodule, lora_types) or hasattr(submodule, "to_lora")):
                modules[key] = type(submodule).__name__
    return modules


# --- reading and filling -------------------------------------------------------------


def _read_yaml(path: Path, problems: list[str]) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        reason = getattr(error, "problem", None) or str(error)
        problems.append(f"{path}: {line}invalid YAML: {reason}")
        return {}
    except RecursionError:
        problems.append(f"{path}: invalid YAML: nested too deeply to be a recipe")
        return {}
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not valid UTF-8 (byte {e.start}); save it as UTF-8")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        return {}
    return data


def _fill(obj: Any, mapping: dict, prefix: str, where: str, problems: list[str],
          origins: dict[str, tuple[str, str]]) -> None:
    """Set the dataclass `obj` from a YAML mapping, recursing into sections."""
    hints = typing.get_type_hints(type(obj))
    names = _settable_fields(obj)
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            problems.append(f"{where}: {dotted}: {_unknown_key(str(key), names, prefix)}")
        elif dataclasses.is_dataclass(hints[key]):
            if isinstance(value, dict):
                _fill(getattr(obj, key), value, f"{dotted}.", where, problems, origins)
            elif value is not None:
                problems.append(f"{where}: {dotted}: expected a mapping, got {_describe(value)}")
        else:
            _assign(obj, key, value, hints[key], where, dotted, problems)
            origins[dotted] = (where, dotted)


def _assign(obj: Any, key: str, value: Any, hint: Any, where: str, dotted: str,
            problems: list[str]) -> None:
    try:
        setattr(obj, key, _coerce(value, hint))
    except TypeError:
        problems.append(f"{where}: {dotted}: expected {_type_name(hint)}, got {_describe(value)}")


def _coerce(value: Any, hint: Any) -> Any:
    """`value` checked against the type `hint` (int is fine for float, bool is not an int)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner)
    if typing.get_origin(hint) is list and isinstance(value, list):
        return [_coerce(item, args[0]) for item in value]
    if hint is float and isinstance(value, str) and _EXPONENT_NUMBER.match(value):
        return float(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    raise TypeError(value)


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _type_name(arg) for arg in args)
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(args[0])}"
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _settable_fields(obj: Any) -> list[str]:
    # `tiers` has its own parser and `tier` is an output of load_recipe.
    return [f.name for f in dataclasses.fields(obj) if f.name not in ("tier", "tiers")]


def _all_dotted_keys() -> list[str]:
    recipe = Recipe()
    keys = []
    for name in _settable_fields(recipe):
        section = getattr(recipe, name)
        if dataclasses.is_dataclass(section):
            keys += [f"{name}.{sub}" for sub in _settable_fields(section)]
        else:
            keys.append(name)
    return keys


def _unknown_key(key: str, names: list[str], prefix: str) -> str:
    """'unknown key', with the closest valid key in this section or the section it belongs in."""
    if not prefix and key == "tier":
        return "unknown key; the tier is chosen when loading (--tier), not in the recipe"
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f"unknown key; did you mean '{prefix}{close[0]}'?"
    if prefix.startswith("tiers."):
        return f"unknown key; a tier can set only {', '.join(names)}"
    elsewhere = [dotted for dotted in _all_dotted_keys() if dotted.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"unknown key here; did you mean '{elsewhere[0]}'?"
    return f"unknown key; valid keys: {', '.join(prefix + name for name in names)}"


# --- tiers and overrides -------------------------------------------------------------


def _parse_tiers(raw: Any, where: str, problems: list[str]) -> dict[int, TierConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{where}: tiers: expected a mapping GB -> settings, got {_describe(raw)}")
        return {}
    tiers = {}
    for key, settings in raw.items():
        number = int(key) if isinstance(key, (int, str)) and str(key).isdigit() else None
        if number not in MEMORY_TIERS:
            problems.append(f"{where}: tiers.{key}: bad tier; tiers are {_tier_list()} (GB)")
            continue
        tiers[number] = TierConfig()
        if isinstance(settings, dict):
            _fill(tiers[number], settings, f"tiers.{key}.", where, problems, {})
        elif settings is not None:
            problems.append(f"{where}: tiers.{key}: expected a mapping, got {_describe(settings)}")
    return tiers


def _choose_tier(tier: int | None, problems: list[str]) -> int:
    if tier is None:
        return detect_tier()
    if isinstance(tier, bool) or tier not in MEMORY_TIERS:
        problems.append(f"--tier {tier}: bad tier; tiers are {_tier_list()} (GB)")
        return detect_tier()
    return tier


def _apply_tier(recipe: Recipe, where: str, origins: dict[str, tuple[str, str]]) -> None:
    settings = recipe.tiers.get(recipe.tier)
    if settings is None:
        return
    for field_name, dotted in TIER_TARGETS.items():
        value = getattr(settings, field_name)
        if value is not None:
            _set_dotted(recipe, dotted, value)
            origins[dotted] = (where, f"tiers.{recipe.tier}.{field_name}")


def _apply_override(recipe: Recipe, item: str, problems: list[str],
                    origins: dict[str, tuple[str, str]]) -> None:
    """Apply one `--set key=value`; the value is YAML, checked against the field's type."""
    where = f"--set {item}"
    dotted, sep, text = item.partition("=")
    dotted = dotted.strip()
    if not sep or not dotted:
        problems.append(f"{where}: expected key=value, e.g. train.iters=600")
        return
    obj, parts = recipe, dotted.split(".")
    for index, part in enumerate(parts):
        prefix = ".".join(parts[:index]) + "." if index else ""
        names = _settable_fields(obj)
        if part not in names:
            if not prefix and part in ("tier", "tiers"):
                message = "pick the tier with --tier; set values directly, e.g. train.batch_size=2"
            else:
                message = _unknown_key(part, names, prefix)
            problems.append(f"{where}: {prefix}{part}: {message}")
            return
        hint = typing.get_type_hints(type(obj))[part]
        is_last = index == len(parts) - 1
        if dataclasses.is_dataclass(hint):
            if is_last:
                example = f"{dotted}.{_settable_fields(getattr(obj, part))[0]}"
                problems.append(f"{where}: {dotted}: a section; set one of its keys, e.g. {example}")
                return
            obj = getattr(obj, part)
        elif not is_last:
            problems.append(f"{where}: {dotted}: {prefix}{part} has no sub-keys")
            return
    _assign(obj, parts[-1], _parse_value(text, hint), hint, where, dotted, problems)
    origins[dotted] = (where, dotted)


def _parse_value(text: str, hint: Any) -> Any:
    """YAML-parse an override value; a str field keeps the raw text ("Reply: yes" stays text)."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):  # not YAML: the text as it is (the type check then says so)
        value = text
    if value is not None and not isinstance(value, str) and _accepts_str(hint):
        return text.strip()
    return value


def _accepts_str(hint: Any) -> bool:
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    return hint is str or (is_union and str in typing.get_args(hint))


def _set_dotted(recipe: Recipe, dotted: str, value: Any) -> None:
    *sections, name = dotted.split(".")
    obj = recipe
    for section in sections:
        obj = getattr(obj, section)
    setattr(obj, name, value)


def _get_dotted(recipe: Recipe, dotted: str) -> Any:
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _tier_list() -> str:
    return ", ".join(str(tier) for tier in MEMORY_TIERS)


# --- checks on the resolved recipe ----------------------------------------------------


def _check_values(recipe: Recipe, where: str, problems: list[str],
                  origins: dict[str, tuple[str, str]]) -> None:
    """Enum choices and ranges, for the resolved values and for every tier in the file."""
    for dotted, (test, good) in _RULES.items():
        value = _get_dotted(recipe, dotted)
        if not test(value):
            source, key = origins.get(dotted, ("defaults", dotted))
            problems.append(f"{source}: {key}: {value!r} is not valid; expected {good}")
    for tier, settings in recipe.tiers.items():
        for field_name, dotted in TIER_TARGETS.items():
            value = getattr(settings, field_name)
            test, good = _RULES.get(dotted, (lambda v: True, ""))
            if value is not None and not test(value):
                key = f"tiers.{tier}.{field_name}"
                problems.append(f"{where}: {key}: {value!r} is not valid; expected {good}")
    if recipe.train.iters is not None and recipe.train.epochs is not None:
        source, key = origins.get("train.epochs", ("defaults", "train.epochs"))
        problems.append(f"{source}: {key}: set only one of train.iters / train.epochs")
    if recipe.preference.loss == "ipo" and recipe.preference.label_smoothing:
        source, key = origins.get("preference.label_smoothing", ("defaults", "preference.label_smoothing"))
        problems.append(f"{source}: {key}: label smoothing applies to the sigmoid loss only; set it to 0 for ipo")


def _check_targets(recipe: Recipe, problems: list[str],
                   origins: dict[str, tuple[str, str]]) -> None:
    """Every LoRA target must be a LoRA-able module of the family's blocks."""
    family = recipe.model.family
    family_source, family_key = origins.get("model.family", ("defaults", "model.family"))
    try:
        modules = _family_lora_modules(family)
    except ConfigError as error:
        problems.append(f"{family_source}: {family_key}: {error}")
        return
    if recipe.fine_tune_type == "full":
        return  # full fine-tuning trains every weight; targets are unused
    source, key = origins.get("lora.targets", ("defaults", "lora.targets"))
    for target in recipe.lora.targets:
        if target not in modules:
            close = difflib.get_close_matches(target, list(modules), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                f"{source}: {key}: '{target}' is not a LoRA-able module of a {family} block; "
                f"{hint}valid: {', '.join(sorted(modules))}"
            )
        elif recipe.fine_tune_type == "dora" and "Switch" in modules[target]:
            problems.append(
                f"{source}: {key}: '{target}' is an expert stack ({modules[target]}); "
                "mlx-lm has no DoRA for it, use fine_tune_type: lora"
            )
