"""Writing files so that a crash never leaves half of one: the only way mlxft writes a file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from mlxft.errors import WriteError


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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk, so a power cut after a rename cannot expose empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
