"""Many LoRA adapters over one loaded base: switch per request without reloading the base.

LoRA layers are attached once; activating an adapter swaps the lora_a/lora_b tensors and
the scale of each wrapped linear (scale 0 where the adapter has no tensors, and for the
base). mlx-lm's own server reloads the model to change adapters; this keeps the base in
memory once and makes a switch cost a few dictionary assignments.

Not thread-safe by design: the server drives it from a single generation thread.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.tuner.lora import LoRALinear

from mlxft.errors import MlxftError
from mlxft.runs.run import Run, is_run

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BASE_NAME = "base"  # the model id that serves the base without any adapter


class AdapterError(MlxftError):
    """An adapter cannot be found, read or applied to this base."""


@dataclass
class Adapter:
    name: str
    path: Path  # the folder holding adapters.safetensors
    scale: float
    system_prompt: str | None
    chat_template: str | None
    base_source: str | None  # the base the adapter was trained on, as the run recorded it
    modules: dict[str, dict[str, mx.array]] = field(default_factory=dict)  # module path -> lora_a/lora_b


def validate_name(name: str) -> str:
    """Names become URL segments and model ids: a plain token, no slashes or dots first."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise AdapterError(f"invalid adapter name {name!r}: use letters, digits, '.', '_', '-' (max 64), starting with a letter or digit")
    if name == BASE_NAME:
        raise AdapterError(f"the adapter name '{BASE_NAME}' is reserved for the base model")
    return name


def read_adapter(name: str, path: str | Path) -> Adapter:
    """Read an adapter from a run folder (its best adapters) or an adapters folder."""
    validate_name(name)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise AdapterError(f"adapter '{name}': {path} is not a folder")
    run = None
    if is_run(path):
        try:
            run = Run.open(path)
        except MlxftError as e:
            raise AdapterError(f"adapter '{name}': {e}") from None
        folder = run.adapters
    elif (path / "adapter_config.json").is_file():
        folder = path
    else:
        raise AdapterError(f"adapter '{name}': {path} is neither an mlxft run folder nor an adapters folder (no adapter_config.json)")
    weights_file = folder / "adapters.safetensors"
    if not weights_file.is_file():
        raise AdapterError(f"adapter '{name}': {weights_file} is missing")
    acfg_file = folder / "adapter_config.json"
    try:
        acfg = json.loads(acfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterError(f"adapter '{name}': cannot read {acfg_file}: {e}") from None
    if not isinstance(acfg, dict):
        raise AdapterError(f"adapter '{name}': {acfg_file} must be a JSON object, got {type(acfg).__name__}")
    kind = acfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapterError(f"adapter '{name}' is fine_tune_type={kind!r}; the server switches LoRA adapters only")
    lora = acfg.get("lora_parameters", {})
    scale = lora.get("scale", 20.0) if isinstance(lora, dict) else None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AdapterError(f"adapter '{name}': {acfg_file}: lora_parameters.scale must be a finite number, got {scale!r}")
    modules = _read_lora_tensors(name, weights_file)
    config = run.config if run is not None else {}
    model = run.recipe_dict.get("model") if run is not None else None
    texts = {key: _text(name, key, value) for key, value in (
        # the run's config.json is the record of training; adapter_config.json carries the same fields
        ("system_prompt", config.get("system_prompt", acfg.get("system_prompt"))),
        ("chat_template", config.get("chat_template") or acfg.get("chat_template")),
        ("base model", (model.get("source") if isinstance(model, dict) else None) or acfg.get("base_model")))}
    return Adapter(name=name, path=folder, scale=float(scale), system_prompt=texts["system_prompt"],
                   chat_template=texts["chat_template"], base_source=texts["base model"], modules=modules)


def _text(name: str, key: str, value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise AdapterError(f"adapter '{name}': its {key} must be text, got {type(value).__name__}")
    return value


def _read_lora_tensors(name: str, weights_file: Path) -> dict[str, dict[str, mx.array]]:
    """Module path -> {"lora_a", "lora_b"} from adapters.safetensors; AdapterError for anything else in it."""
    try:
        weights = mx.load(str(weights_file))
        mx.eval(weights)  # materialise here: lazy arrays are bound to this thread's stream, generation runs on another
    except (RuntimeError, ValueError, OSError) as e:  # mlx reports a damaged file as RuntimeError
        raise AdapterError(f"adapter '{name}': cannot read {weights_file}: {e}") from None
    if not isinstance(weights, dict):
        raise AdapterError(f"adapter '{name}': {weights_file} is not a safetensors file of named tensors")
    modules: dict[str, dict[str, mx.array]] = {}
    for key, value in weights.items():
        mod, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise AdapterError(f"adapter '{name}': unexpected tensor {key} in {weights_file} (LoRA tensors only)")
        if value.ndim != 2 or not mx.issubdtype(value.dtype, mx.floating):
            raise AdapterError(f"adapter '{name}': {key} in {weights_file} is {value.dtype} of shape {value.shape}; "
                               "LoRA tensors are 2-D floating point")
        modules.setdefault(mod, {})[leaf] = value
    return modules


class AdapterPool:
    """One base model, LoRA layers attached on demand, any number of adapters held in memory."""

    def __init__(self, model: nn.Module, tokenizer, base_template: str | None):
        self.model = model
        self.tokenizer = tokenizer
        self.base_template = base_template
        self.adapters: dict[str, Adapter] = {}
        self.wrapped: dict[str, nn.Module] = {}  # module path -> LoRALinear attached to the base
        self.active: str | None = None

    def names(self) -> list[str]:
        return [BASE_NAME, *self.adapters]

    def add(self, adapter: Adapter) -> None:
        """Check the adapter fits this base, wrap any linear it needs that is not wrapped yet."""
        if adapter.name in self.adapters:
            raise AdapterError(f"an adapter named '{adapter.name}' is already loaded")
        new = {}
        modules = dict(self.model.named_modules())
        for path, tensors in adapter.modules.items():
            if set(tensors) != {"lora_a", "lora_b"}:
                raise AdapterError(f"adapter '{adapter.name}': {path} lacks lora_a or lora_b")
            target = self.wrapped.get(path) or new.get(path)
            if target is None:
                base = modules.get(path)
                if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                    raise AdapterError(f"adapter '{adapter.name}' does not fit this base: no linear layer at {path}")
                target = LoRALinear.from_base(base, r=tensors["lora_a"].shape[1], scale=0.0)
                new[path] = target
            in_dims, out_dims = target.lora_a.shape[0], target.lora_b.shape[1]
            a, b = tensors["lora_a"], tensors["lora_b"]
            if a.shape[0] != in_dims or b.shape[1] != out_dims or a.shape[1] != b.shape[0]:
                raise AdapterError(
                    f"adapter '{adapter.name}' does not fit this base at {path}: lora_a {a.shape}, lora_b {b.shape} "
                    f"for a {in_dims}->{out_dims} linear (trained on another base model?)"
                )
        if new:
            mx.eval([m.parameters() for m in new.values()])  # same reason as in read_adapter
            self.model.update_modules(tree_unflatten(list(new.items())))
            self.wrapped.update(new)
            self.active = None  # new layers start at scale 0; force a re-activation
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterError(f"no adapter named '{name}'")
        del self.adapters[name]  # its wrapped layers stay (scale 0 for others); cheap and keeps shapes stable
        if self.active == name:
            self.active = None

    def activate(self, name: str) -> None:
        """Point every wrapped linear at `name`'s tensors (scale 0 where it has none), set its chat template."""
        if name == self.active:
            return
        adapter = self.adapters.get(name) if name != BASE_NAME else None
        if name != BASE_NAME and adapter is None:
            raise AdapterError(f"no adapter named '{name}'")
        for path, layer in self.wrapped.items():
            tensors = adapter.modules.get(path) if adapter else None
            if tensors is None:
                layer.scale = 0.0
            else:
                layer.lora_a, layer.lora_b, layer.scale = tensors["lora_a"], tensors["lora_b"], adapter.scale
        template = (adapter.chat_template if adapter else None) or self.base_template
        if template:
            self.tokenizer._tokenizer.chat_template = template
        self.active = name

    def system_prompt(self, name: str) -> str | None:
        return self.adapters[name].system_prompt if name in self.adapters else None
