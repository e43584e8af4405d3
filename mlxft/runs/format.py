"""Which run folders this mlxft reads: RUN/config.json's run format and the mlxft that wrote it.

A run folder records `run_format` (an integer, raised when config.json or the folder layout
changes in a way older code would misread) and `versions.mlxft`. A run from another mlxft
version in a format this one knows is read as it is (`version_note` says so where it matters,
e.g. on resume); a newer format, or a config.json without what every reader relies on, is
refused with one message naming both versions. Folders written before run formats existed
carry none and are format 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxft

from mlxft.errors import MlxftError

RUN_FORMAT = 1  # this mlxft writes and reads format 1 (and every older one: there is none yet)
_RECIPE_SECTIONS = ("model", "lora", "train", "data", "eval", "preference", "grpo", "tiers")


class RunFormatError(MlxftError):
    """config.json cannot be read, or was written in a run format this mlxft does not know."""


def written_by(config: dict) -> str:
    """The mlxft version a run's config.json names ("unknown" when it names none)."""
    versions = config.get("versions") if isinstance(config, dict) else None
    version = versions.get("mlxft") if isinstance(versions, dict) else None
    return str(version) if version is not None else "unknown"


def read_run_config(path: Path) -> dict:
    """RUN/config.json as a dict, checked by `check_run_config`; RunFormatError when unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunFormatError(f"{path.parent} is not an mlxft run folder (no config.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RunFormatError(f"cannot read {path}: {e}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}): the run folder is damaged") from None
    except RecursionError:
        raise RunFormatError(f"{path} is nested too deeply to be a run's config.json") from None
    check_run_config(config, path)
    return config


def check_run_config(config, path: Path) -> None:
    """Refuse a config.json this mlxft would misread: not an object, a newer run format, no recipe."""
    ours = mlxft.__version__
    if not isinstance(config, dict):
        raise RunFormatError(f"{path}: expected a JSON object, got {type(config).__name__} (this is mlxft {ours})")
    theirs = written_by(config)
    run_format = config.get("run_format", 1)
    if isinstance(run_format, bool) or not isinstance(run_format, int) or run_format < 1:
        raise RunFormatError(f"{path}: run_format {run_format!r} is not a run format (written by mlxft {theirs}; "
                             f"this is mlxft {ours}, which reads run format {RUN_FORMAT})")
    if run_format > RUN_FORMAT:
        raise RunFormatError(f"{path.parent} was written by mlxft {theirs} in run format {run_format}; this mlxft "
                             f"{ours} reads run format {RUN_FORMAT} and older: upgrade mlxft to use this run")
    if not isinstance(config.get("recipe"), dict):
        raise RunFormatError(f"{path} has no recipe section: not a run this mlxft {ours} can read "
                             f"(written by mlxft {theirs})")
    wrong = [f"recipe.{k}" for k in _RECIPE_SECTIONS if not isinstance(config["recipe"].get(k, {}), dict)]
    wrong += [k for k in ("data", "base_model", "versions") if not isinstance(config.get(k, {}), dict)]
    wrong += [k for k in ("chat_template", "system_prompt") if not isinstance(config.get(k, ""), (str, type(None)))]
    tiers = config["recipe"].get("tiers", {})
    if isinstance(tiers, dict) and not all(str(k).isdigit() and isinstance(v, dict) for k, v in tiers.items()):
        wrong.append("recipe.tiers")
    if wrong:
        raise RunFormatError(f"{path}: {', '.join(wrong)} not as mlxft {ours} writes them (written by mlxft "
                             f"{theirs}): the run folder is damaged or from an incompatible version")


def check_resumable(config: dict, path: Path) -> None:
    """What `train --resume` reads besides the recipe: the data folder and its recorded hashes."""
    data = config.get("data") or {}
    digests = data.get("sha256")
    if not isinstance(data.get("path"), str) or not isinstance(digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise RunFormatError(f"{path}: data.path and data.sha256 (the data the run trained on) are missing or "
                             f"malformed, so it cannot be resumed (written by mlxft {written_by(config)})")


def version_note(config: dict) -> str | None:
    """One line when the run was written by another mlxft version than this one (None when the same)."""
    theirs, ours = written_by(config), mlxft.__version__
    if theirs == ours:
        return None
    return (f"note: this run was written by mlxft {theirs} (run format {config.get('run_format', 1)}); "
            f"this is mlxft {ours}: read as run format {RUN_FORMAT}")
