"""A run folder: every path of it in one place (`RunDir`), and what it says about itself (`Run`).

`runs/<recipe>-<timestamp>/` holds config.json (written by training: mlxft/training/setup.py),
metrics.jsonl, checkpoints/, adapters/ (adapters/best/) and eval.json. Everything that reads a
run back (eval, generate, chat, serve, fuse, report, baseline, `runs compare`) reads it through
`Run`, so the meaning of config.json's keys lives here only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mlxft.config import Recipe
from mlxft.errors import MlxftError
from mlxft.files import write_atomic, write_error
from mlxft.rank import is_main
from mlxft.runs.format import RUN_FORMAT, read_run_config


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def create(cls, recipe_name: str, root: Path | None = None) -> "RunDir":
        base = Path(root or os.environ.get("MLXFT_RUNS") or "runs")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(100):
            path = base / (f"{recipe_name}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir(parents=True)
                return cls(path)
            except FileExistsError:
                continue
        raise MlxftError(f"could not create a run folder under {base}")

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not run.config.is_file():
            raise MlxftError(f"{path} is not an mlxft run folder (no config.json)")
        return run

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def best_dir(self) -> Path:
        """Where training keeps the lowest-validation-loss adapter (stock mlx-lm loads it)."""
        return self.adapters / "best"

    @property
    def best_adapters(self) -> Path:
        """The adapter to evaluate and serve: the best one when validation chose one, else the last."""
        return self.best_dir if (self.best_dir / "adapters.safetensors").is_file() else self.adapters

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """RUN/checkpoints/step-000040: zero-padded so names sort by step."""
        return self.checkpoints / f"step-{step:06d}"

    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    def read_config(self) -> dict:
        """config.json, checked: readable JSON from a run format this mlxft reads (else a typed error
        naming both mlxft versions: runs/format.py)."""
        return read_run_config(self.config)

    def write_config(self, config: dict) -> None:
        if not is_main():  # only rank 0 of a data-parallel run writes the run folder
            return
        write_atomic(self.config, json.dumps({"run_format": RUN_FORMAT, **config}, indent=2, default=str) + "\n")

    def log_metrics(self, record: dict) -> None:
        if not is_main():
            return
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.metrics, e, "its earlier lines are kept") from e


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold one object, or one clear error naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MlxftError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise MlxftError(f"{path} is not a JSON object")
    return data


def is_run(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "adapters").exists()


class Run:
    """A finished or running training run, read back from its folder.

    The one reader of config.json: base model, precision, chat template and system prompt the run
    was trained with, its method and recipe, and which adapter to use (the best, else the last).
    """

    def __init__(self, folder: RunDir, config: dict):
        self.folder = folder
        self.config = config

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        folder = RunDir.open(path)
        return cls(folder, folder.read_config())

    @property
    def root(self) -> Path:
        return self.folder.root

    @property
    def recipe_dict(self) -> dict:
        return self.config.get("recipe") or {}

    @cached_property
    def recipe(self) -> Recipe:
        """The resolved recipe the run trained with."""
        return Recipe.from_dict(self.recipe_dict)

    @property
    def name(self) -> str:
        return self.recipe_dict.get("name", "run")

    @property
    def method(self) -> str:
        """sft, dpo or orpo: how the adapter was trained."""
        return (self.recipe_dict.get("train") or {}).get("method", "sft")

    @property
    def base_source(self) -> str:
        return self.recipe_dict["model"]["source"]

    @property
    def quantize(self) -> int | None:
        return self.recipe_dict.get("quantize")

    @property
    def base(self) -> dict:
        """config.json's base_model: source, resolved path, precision, note."""
        return self.config.get("base_model") or {}

    @property
    def system_prompt(self) -> str | None:
        """The system prompt used in training, which inference must use too (the parity rule)."""
        return self.config.get("system_prompt")

    def system(self, override: str | None = None) -> str | None:
        """`override` (a --system flag, a request's own prompt) when given, else the training one."""
        return override if override is not None else self.system_prompt

    @property
    def chat_template(self) -> str | None:
        return self.config.get("chat_template")

    @property
    def adapters(self) -> Path:
        """The adapter folder to evaluate, generate and serve with: the best one, else the last."""
        return self.folder.best_adapters

    @property
    def data_path(self) -> Path | None:
        path = (self.config.get("data") or {}).get("path")
        return Path(path) if path else None

    @property
    def data_sha256(self) -> dict:
        return (self.config.get("data") or {}).get("sha256") or {}

    @property
    def versions(self) -> dict:
        return self.config.get("versions") or {}
