"""Every path of a run in one place: `runs/<recipe>-<timestamp>/`."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlxft.errors import MlxftError, WriteError
from mlxft.run_format import RUN_FORMAT, read_run_config


def write_error(path: Path, error: Exception, kept: str | None = None) -> WriteError:
    """A failed write (OSError; mlx's save functions raise RuntimeError) as one typed error naming
    the path and what is left there: `kept`, else the previous file (unchanged) or nothing."""
    if isinstance(error, WriteError):
        return error
    errno = getattr(error, "errno", None)
    reason = os.strerror(errno) if errno else str(error) or type(error).__name__
    if kept is None:
        kept = f"the previous {Path(path).name} is unchanged" if Path(path).exists() else "nothing was written there"
    return WriteError(f"could not write {path} ({reason}); {kept}", path, errno)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new, never half.

    A failed write (a full disk) raises WriteError naming `path`; the old content stays."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise


def jsonl(rows) -> str:
    """Rows as JSON Lines text (UTF-8 kept as is), the form every data file here uses."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_jsonl(path: Path, rows) -> None:
    """Write rows as a .jsonl file atomically."""
    write_atomic(path, jsonl(rows))


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
        naming both mlxft versions)."""
        return read_run_config(self.config)

    def write_config(self, config: dict) -> None:
        if not _writes():
            return
        write_atomic(self.config, json.dumps({"run_format": RUN_FORMAT, **config}, indent=2, default=str) + "\n")

    def log_metrics(self, record: dict) -> None:
        if not _writes():
            return
        try:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise write_error(self.metrics, e, "its earlier lines are kept") from e


def _writes() -> bool:
    """Only rank 0 of a data-parallel run writes the run folder (always true in a single process)."""
    from mlxft.distributed import is_main

    return is_main()


def is_run(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / "adapters").exists()
