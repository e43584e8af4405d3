"""`mlxft data prepare` and `mlxft data check --fix`: write a clean chat-JSONL dataset folder.

prepare: read any supported format, refuse on broken rows (listing them), drop exact
duplicates, split a single source deterministically, and write train/valid/test.jsonl
plus manifest.json. A row's split comes from a hash of its normalised text and the
seed, not its position, so reordering the input (or appending rows) never moves a row
between splits, and near duplicates always land in the same split (no leakage).

Both writers build the folder under a temporary name beside OUT and rename it into
place, so OUT is either complete or absent; a non-empty OUT is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlxft.data.check import Report, check_duplicates, check_rows, check_tokens
from mlxft.data.formats import Example, load_dataset, near_key
from mlxft.errors import DataError
from mlxft.files import jsonl, write_error

DEFAULT_SPLIT = (0.9, 0.05, 0.05)


@dataclass
class Prepared:
    out: Path
    manifest: dict


def parse_split(text: str) -> tuple[float, float, float]:
    """'0.9,0.05,0.05' -> fractions of train/valid/test (must sum to 1)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise DataError(f"--split {text!r}: expected three numbers like 0.9,0.05,0.05") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or abs(sum(parts) - 1) > 1e-6 or parts[0] == 0:
        raise DataError(f"--split {text!r}: expected train,valid,test fractions >= 0 summing to 1 (train > 0)")
    return parts


def assign_split(row: dict | Example, seed: int, fractions=DEFAULT_SPLIT) -> str:
    """train/valid/test from a hash of the row's normalised text: stable under reordering."""
    near = row.near if isinstance(row, Example) else near_key(row)
    digest = hashlib.sha256(f"{seed}\x00{near}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "valid" if u < fractions[0] + fractions[1] else "test"


def prepare_dataset(src, out, fractions=DEFAULT_SPLIT, seed: int = 0, fmt: str | None = None,
                    tokenizer=None, recipe=None, log=print) -> Prepared:
    """Normalise `src` (file or folder) into `out`/{train,valid,test}.jsonl + manifest.json."""
    src, out = Path(src), Path(out)
    _refuse_non_empty(out)
    ds = load_dataset(src, fmt)
    report = Report(str(src), dataset=ds, problems=list(ds.problems))
    for rows in ds.splits.values():
        check_rows(rows, report)
    check_duplicates(ds, report)  # leakage between named splits is refused too
    errors = report.errors
    if errors:
        listed = "\n".join(f"  {p}" for p in errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise DataError(f"{len(errors)} problems in {src}; nothing written:\n{listed}\n"
                        f"Fix them, or write a copy without them: mlxft data check {src} --fix CLEAN")
    if src.is_file():  # one file: split it, whatever its name
        ds.splits = {"data": [ex for rows in ds.splits.values() for ex in rows]}
    splits, duplicates = _split(ds, fractions, seed)
    system = recipe.data.system_prompt if recipe is not None else None
    manifest = {
        "source": str(src.resolve()),
        "formats": {str(Path(f).relative_to(src) if src.is_dir() else Path(f).name): v for f, v in ds.formats.items()},
        "seed": seed,
        "split": list(fractions) if set(ds.splits) == {"data"} else "kept the input's train/valid/test files",
        "dropped_exact_duplicates": duplicates,
        "splits": {},
    }
    files = {}
    for split, rows in splits.items():
        body = jsonl(ex.row for ex in rows).encode()
        files[f"{split}.jsonl"] = body
        entry = {"rows": len(rows), "sha256": hashlib.sha256(body).hexdigest()}
        if tokenizer is not None:
            entry["tokens"] = _token_stats(rows, tokenizer, system, recipe)
        manifest["splits"][split] = entry
    if tokenizer is not None:
        manifest["tokenizer"] = {"recipe": getattr(recipe, "name", None), "model": getattr(recipe.model, "source", None)
                                 if recipe is not None else None, "system_prompt": system}
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    write_folder(out, files)
    for split, entry in manifest["splits"].items():
        log(f"{split:6} {entry['rows']:>8} rows")
    if duplicates:
        log(f"dropped {duplicates} exact duplicates")
    return Prepared(out, manifest)


def _split(ds, fractions, seed) -> tuple[dict[str, list[Example]], int]:
    """Dedupe exact rows (first kept), then hash-split a single pool; named splits are kept."""
    seen, duplicates = set(), 0
    out: dict[str, list[Example]] = {}
    for name, rows in ds.splits.items():
        for ex in rows:
            key = ex.exact
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            split = assign_split(ex, seed, fractions) if name == "data" else name
            out.setdefault(split, []).append(ex)
    order = ("train", "valid", "test")
    return {s: out[s] for s in sorted(out, key=lambda s: order.index(s) if s in order else 9)}, duplicates


def _token_stats(rows, tokenizer, system, recipe) -> dict:
    max_len = recipe.train.max_seq_length if recipe is not None else None
    scratch = Report("")
    stats = check_tokens(rows, tokenizer, system, max_len, scratch)
    lengths = sorted(stats.pop("lengths"))
    stats["mean_tokens"] = round(sum(lengths) / len(lengths), 1) if lengths else 0
    stats["p95_tokens"] = lengths[int(0.95 * (len(lengths) - 1))] if lengths else 0
    stats["max_seq_length"] = max_len
    stats["unrenderable_rows"] = len(scratch.errors)
    return stats


def write_clean(report: Report, out) -> tuple[dict[str, int], int]:
    """`check --fix`: the rows that passed every check, as chat JSONL, plus fix_log.jsonl saying
    what was dropped and why. The input is never touched. Returns (rows kept per split, rows dropped)."""
    out = Path(out)
    _refuse_non_empty(out)
    files, kept = {}, {}
    for split, rows in report.dataset.splits.items():
        good = [ex for ex in rows if ex.where not in report.dropped]
        kept[split] = len(good)
        files[f"{split}.jsonl"] = jsonl(ex.row for ex in good).encode()
    log = [{"where": p.where, "dropped": True, "why": p.message} for p in report.dataset.problems
           if p.severity == "error"]  # rows that could not even be read
    log += [{"where": w, "dropped": True, "why": why} for w, why in report.dropped.items()]
    files["fix_log.jsonl"] = jsonl(log).encode()
    write_folder(out, files)
    return kept, len(log)


def _refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; choose a new output folder")


def write_folder(out: Path, files: dict[str, bytes]) -> None:
    """Write all files into a temporary folder beside `out`, then rename it to `out`."""
    tmp, name = None, None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        name = None
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a folder
        os.replace(tmp, out)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk: nothing half-written is left, and the message says where
            raise write_error(out / name if name else out, e, f"nothing was written to {out}") from e
        raise
