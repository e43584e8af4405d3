"""Read any supported dataset file and normalise its rows to chat rows.

Inputs: JSONL, a JSON array, or CSV/TSV with named columns; one file or a folder.
Row formats (auto-detected per file, or forced with `fmt`): chat (`messages`),
ShareGPT (`conversations`), Alpaca (instruction/input/output), completions
(prompt/completion), plain text (`text`) and preference pairs (chosen/rejected).

Nothing here raises for a bad row: every problem becomes a `Problem` with its file
and line, so `mlxft data check` can list them all. Only a path that cannot be read
at all raises `DataError`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mlxft.errors import DataError

FORMATS = ("chat", "sharegpt", "alpaca", "completions", "text", "preference", "prompts")
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
# Folder file stems that name a split; anything else in a folder is one pool of rows.
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid",
                 "dev": "valid", "test": "test"}
MAX_LINE_BYTES = 8 * 1024 * 1024  # one row this long is a broken export, not a training example
# Keys a row may carry besides its format's own (ignored, not warned about).
_NEUTRAL_KEYS = {"id", "source", "metadata"}
_KEYS = {
    "chat": ({"messages"}, {"tools", "rejected", "reference"}),
    "sharegpt": ({"conversations"}, {"system", "tools"}),
    "alpaca": ({"instruction", "output"}, {"input", "system"}),
    "completions": ({"prompt", "completion"}, {"system"}),
    "text": ({"text"}, set()),
    "preference": ({"chosen", "rejected"}, {"prompt", "messages", "system"}),
    "prompts": ({"prompt"}, {"reference", "system"}),  # GRPO: a prompt, and optionally what a reward compares with
}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "tool": "tool", "observation": "tool", "function_response": "tool"}
_MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}
# CSV cells holding these keys may carry JSON (a list of messages).
_JSON_COLUMNS = ("messages", "conversations", "chosen", "rejected", "prompt", "tools")
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
         b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


@dataclass
class Problem:
    severity: str  # "error" | "warning"
    where: str  # "path:line", "path[item]" or "path"
    message: str
    code: str = ""  # short kind, for grouping in the summary

    def __str__(self) -> str:
        return f"{self.where}: {self.severity}: {self.message}"


@dataclass
class Example:
    """One row that read and normalised cleanly (it may still fail the lint checks)."""

    where: str
    row: dict  # {"messages": [...], "tools"?, "rejected"?} or {"text": str}

    # The keys are computed once per row: duplicates, leakage, splitting and the token-check
    # cache all use them, and json.dumps of 100k rows is seconds.
    @cached_property
    def exact(self) -> str:
        return exact_key(self.row)

    @cached_property
    def near(self) -> str:
        return near_key(self.row)


_NOT_WORD = re.compile(r"[\W_]+")


def near_key(row: dict) -> str:
    """Text with case, punctuation and spacing removed: rows equal under this are near duplicates."""
    if "text" in row:
        parts = [row["text"]]
    else:
        parts = [f"{m['role'][0]} {m['content']} " + ("null" if m.get("tool_calls") is None else
                                                     json.dumps(m["tool_calls"], sort_keys=True))
                 for m in row["messages"]]
    return _NOT_WORD.sub(" ", " ".join(parts).lower()).strip()


def exact_key(row: dict) -> str:
    return hashlib.sha1(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Dataset:
    splits: dict[str, list[Example]] = field(default_factory=dict)  # split name -> rows
    formats: dict[str, str] = field(default_factory=dict)  # file -> detected/forced format
    files: list[Path] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def find_files(path: Path) -> dict[str, list[Path]]:
    """Split name -> files. A file alone is its own split ("train" if so named, else "data")."""
    path = Path(path)
    if path.is_file():
        return {SPLIT_ALIASES.get(path.stem.lower(), "data"): [path]}
    if not path.is_dir():
        raise DataError(f"not found: {path}")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not p.name.startswith("."))
    named = [p for p in files if p.stem.lower() in SPLIT_ALIASES]
    if named:
        out: dict[str, list[Path]] = {}
        for p in named:
            out.setdefault(SPLIT_ALIASES[p.stem.lower()], []).append(p)
        return out
    if not files:
        raise DataError(f"{path}: no data files (train/valid/test or any {'/'.join(DATA_SUFFIXES)}) in this folder")
    return {"data": files}


def load_dataset(path: Path, fmt: str | None = None) -> Dataset:
    """Read every data file under `path`, normalising rows and collecting problems."""
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}'; one of: {', '.join(FORMATS)}")
    ds = Dataset()
    for split, files in find_files(Path(path)).items():
        rows = ds.splits.setdefault(split, [])
        for f in files:
            ds.files.append(f)
            records = read_records(f, ds.problems)
            before = len(rows)
            ds.formats[str(f)] = _normalise_file(f, records, fmt, rows, ds.problems)
            if records and len(rows) == before:
                _no_usable_rows(f, records, fmt, ds.problems)
    if not any(ds.splits.values()):  # never "OK to train" on nothing
        ds.problems.append(Problem("error", str(path), f"no usable rows in {path} (see the problems above)",
                                   "no-rows"))
    return ds


def _no_usable_rows(path: Path, records, fmt: str | None, problems: list[Problem]) -> None:
    """A file whose records all failed: say so once, naming the columns when none fits a format."""
    keys = sorted({str(k) for _, obj in records if isinstance(obj, dict) for k in obj})
    shapeless = all(isinstance(obj, dict) and detect_row(obj) is None for _, obj in records)
    if fmt is None and shapeless:
        found = ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "") or "none"
        expected = "; ".join(f"{name}: {', '.join(sorted(_KEYS[name][0]))}" for name in FORMATS)
        message = f"no usable rows: the columns found ({found}) match no known format; expected ({expected})"
    else:
        message = ("no usable rows: its only row has an error (above)" if len(records) == 1 else
                   f"no usable rows: all {len(records)} rows have errors (listed above)")
    problems.append(Problem("error", str(path), message, "no-rows"))


# ---------------------------------------------------------------- reading


def read_records(path: Path, problems: list[Problem]) -> list[tuple[str, object]]:
    """(location, parsed object) for each record; unreadable records become problems."""
    data = path.read_bytes()
    where = str(path)
    if not data.strip():
        problems.append(Problem("error", where, "file is empty", "empty-file"))
        return []
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            problems.append(Problem("error", where, f"file is {name}-encoded; save it as UTF-8", "encoding"))
            return []
    if data.startswith(b"\xef\xbb\xbf"):
        problems.append(Problem("warning", where, "starts with a UTF-8 byte-order mark (BOM); "
                                "mlx-lm's loader rejects it, prepare and --fix strip it", "bom"))
        data = data[3:]
    kind = _container(path, data)
    if kind == "csv":
        return _read_csv(path, data, "\t" if path.suffix.lower() == ".tsv" else ",", problems)
    if kind == "json":
        return _read_json_array(path, data, problems)
    return _read_jsonl(path, data, problems)


def _container(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    first = data.lstrip()[:1]
    return "json" if first == b"[" or (suffix == ".json" and first != b"{") else "jsonl"


def _decode(raw: bytes, where: str, problems: list[Problem]) -> str | None:
    if b"\x00" in raw:
        column = raw.index(b"\x00") + 1
        problems.append(Problem("error", where, f"NUL byte at column {column} (binary data?)", "encoding"))
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(Problem("error", where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}; "
                                "latin-1? re-save as UTF-8)", "encoding"))
        return None


_UNREADABLE = object()  # what _parse_json returns for text that is not JSON (None is JSON null)


def _parse_json(text: str, where: str, problems: list[Problem]):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(Problem("error", where, f"invalid JSON ({e.msg} at column {e.colno})", "json"))
    except RecursionError:
        problems.append(Problem("error", where, "JSON nested too deeply to be a training row", "json"))
    return _UNREADABLE


def _read_jsonl(path: Path, data: bytes, problems: list[Problem]) -> list[tuple[str, object]]:
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        if len(raw) > MAX_LINE_BYTES:
            problems.append(Problem("error", where, f"line is {len(raw) / 2**20:.0f} MiB, over the "
                                    f"{MAX_LINE_BYTES // 2**20} MiB a row may be", "too-long"))
            continue
        text = _decode(raw, where, problems)
        obj = _parse_json(text, where, problems) if text is not None else _UNREADABLE
        if obj is not _UNREADABLE:  # a JSON null is a row too (reported as one), not a skipped line
            out.append((where, obj))
    return out


def _read_json_array(path: Path, data: bytes, problems: list[Problem]) -> list[tuple[str, object]]:
    text = _decode(data, str(path), problems)
    if text is None:
        return []
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append(Problem("error", f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})", "json"))
        return []
    except RecursionError:
        problems.append(Problem("error", str(path), "JSON nested too deeply to be a dataset", "json"))
        return []
    if not isinstance(obj, list):
        problems.append(Problem("error", str(path), f"expected a JSON array of rows, got a JSON {_kind(obj)}", "type"))
        return []
    if not obj:
        problems.append(Problem("error", str(path), "no rows: the JSON array is empty", "no-rows"))
    return [(f"{path}[{i}]", item) for i, item in enumerate(obj)]


def _read_csv(path: Path, data: bytes, delimiter: str, problems: list[Problem]) -> list[tuple[str, object]]:
    text = _decode(data, str(path), problems)
    if text is None:
        return []
    csv.field_size_limit(MAX_LINE_BYTES)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = []
    try:
        header = reader.fieldnames or []
        if not header or any(not (h or "").strip() for h in header):
            problems.append(Problem("error", f"{path}:1", f"header needs a name for every column, got {header}", "csv"))
            return []
        seen = 0
        for seen, row in enumerate(reader, 1):
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                n = len(header) + len(row.get(None, [])) - sum(v is None for v in row.values())
                problems.append(Problem("error", where, f"row has {n} fields, the header has {len(header)} "
                                        f"({', '.join(header)})", "csv"))
                continue
            out.append((where, _json_cells(row)))
    except csv.Error as e:
        problems.append(Problem("error", f"{path}:{reader.line_num}", f"CSV: {e}", "csv"))
        return out
    if not seen:
        problems.append(Problem("error", str(path), f"no rows: only a header line (columns: {', '.join(header)})",
                                "no-rows"))
    return out


def _json_cells(row: dict) -> dict:
    """CSV cells are strings; a cell holding a JSON list (messages, chosen, ...) is parsed."""
    for key in _JSON_COLUMNS:
        value = row.get(key)
        if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
            try:
                row[key] = json.loads(value)
            except (json.JSONDecodeError, RecursionError):
                pass  # left as text; the normaliser reports the wrong type
    return row


def _kind(obj) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(obj), "number")


# ---------------------------------------------------------------- detection + normalising


def detect_row(obj) -> str | None:
    """The format a row's keys say it is in, or None."""
    if not isinstance(obj, dict):
        return None
    for fmt in ("preference", "chat", "sharegpt", "alpaca", "completions", "text", "prompts"):
        if _KEYS[fmt][0] <= obj.keys():
            return fmt
    return None


def _normalise_file(path: Path, records, fmt: str | None, rows: list[Example], problems: list[Problem]) -> str:
    votes = Counter(detect_row(obj) for _, obj in records[:200])
    votes.pop(None, None)
    file_fmt = fmt or (votes.most_common(1)[0][0] if votes else "unknown")
    for where, obj in records:
        if not isinstance(obj, dict):
            problems.append(Problem("error", where, f"expected a JSON object per row, got a JSON {_kind(obj)}", "type"))
            continue
        row_fmt = detect_row(obj)
        if row_fmt is None and fmt is None:
            problems.append(Problem("error", where, f"unknown row shape (keys: {', '.join(sorted(obj)) or 'none'}); "
                                    "expected messages, conversations, instruction/output, prompt/completion, "
                                    "text, or chosen/rejected", "format"))
            continue
        if fmt is None and row_fmt != file_fmt:
            problems.append(Problem("error", where, f"mixed formats: this row is {row_fmt}, the file is "
                                    f"{file_fmt} (from its first rows)", "mixed-format"))
            continue
        row = normalise_row(obj, file_fmt, where, problems)
        if row is not None:
            rows.append(Example(where, row))
    return file_fmt


def normalise_row(obj: dict, fmt: str, where: str, problems: list[Problem]) -> dict | None:
    """One row in `fmt` -> a chat row, or None (with a problem recorded) if it does not fit."""
    required, optional = _KEYS[fmt]
    missing = sorted(required - obj.keys())
    if missing:
        problems.append(Problem("error", where, f"missing key(s) {', '.join(missing)} for format {fmt}", "format"))
        return None
    unknown = sorted(obj.keys() - required - optional - _NEUTRAL_KEYS)
    if unknown:
        problems.append(Problem("warning", where, f"unknown key(s) {', '.join(unknown)} ignored", "unknown-key"))
    for i, m in enumerate(obj.get("messages") if isinstance(obj.get("messages"), list) else []):
        extra = sorted(m.keys() - _MESSAGE_KEYS) if isinstance(m, dict) else []
        if extra:
            problems.append(Problem("warning", where, f"messages[{i}]: unknown key(s) {', '.join(extra)} ignored",
                                    "unknown-key"))
    try:
        return _NORMALISERS[fmt](obj)
    except _RowError as e:
        problems.append(Problem("error", where, str(e), "type"))
        return None


class _RowError(ValueError):
    pass


def _text(value, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # text-only content parts
    raise _RowError(f"{what} must be a string, got a JSON {_kind(value)}")


def _messages(value, what: str = "messages") -> list[dict]:
    if not isinstance(value, list):
        raise _RowError(f"{what} must be a list of messages, got a JSON {_kind(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _RowError(f"{what}[{i}] must be an object, got a JSON {_kind(m)}")
        if not isinstance(m.get("role"), str):
            raise _RowError(f"{what}[{i}] needs a string 'role', got {json.dumps(m.get('role'))[:40]}")
        msg = {k: v for k, v in m.items() if k in _MESSAGE_KEYS}
        content = m.get("content")
        if content is None and m.get("tool_calls"):
            msg["content"] = ""  # a pure tool-call turn has no text
        else:
            msg["content"] = _text(content, f"{what}[{i}].content")
        out.append(msg)
    return out


def _chat(obj: dict) -> dict:
    row = {"messages": _messages(obj["messages"])}
    if obj.get("tools"):
        row["tools"] = obj["tools"]
    if obj.get("rejected") is not None:
        row["rejected"] = obj["rejected"]
    if obj.get("reference") is not None:
        row["reference"] = _text(obj["reference"], "reference")
    return row


def _with_system(obj: dict, messages: list[dict]) -> list[dict]:
    if obj.get("system"):
        return [{"role": "system", "content": _text(obj["system"], "system")}, *messages]
    return messages


def _sharegpt(obj: dict) -> dict:
    turns = obj["conversations"]
    if not isinstance(turns, list):
        raise _RowError(f"conversations must be a list, got a JSON {_kind(turns)}")
    messages = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise _RowError(f"conversations[{i}] needs 'from' and 'value'")
        role = _SHAREGPT_ROLES.get(t["from"]) if isinstance(t["from"], str) else None
        if role is None:
            hint = _SHAREGPT_ROLES.get(str(t["from"]).lower())
            raise _RowError(f"conversations[{i}]: unknown speaker {json.dumps(t['from'])[:40]}"
                            + (f" (did you mean '{str(t['from']).lower()}'?)" if hint else ""))
        messages.append({"role": role, "content": _text(t["value"], f"conversations[{i}].value")})
    row = {"messages": _with_system(obj, messages)}
    if obj.get("tools"):
        row["tools"] = obj["tools"]
    return row


def _alpaca(obj: dict) -> dict:
    user = _text(obj["instruction"], "instruction")
    extra = _text(obj.get("input") or "", "input")
    if extra.strip():
        user = f"{user}\n\n{extra}"
    msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(obj["output"], "output")}]
    return {"messages": _with_system(obj, msgs)}


def _completions(obj: dict) -> dict:
    msgs = [{"role": "user", "content": _text(obj["prompt"], "prompt")},
            {"role": "assistant", "content": _text(obj["completion"], "completion")}]
    return {"messages": _with_system(obj, msgs)}


def _prompts(obj: dict) -> dict:
    """A prompt-only row (GRPO): the user turn, with the reference a reward may compare with."""
    prompt = obj["prompt"]
    messages = _messages(prompt, "prompt") if isinstance(prompt, list) else [{"role": "user", "content": _text(prompt, "prompt")}]
    row = {"messages": _with_system(obj, messages)}
    if obj.get("reference") is not None:
        row["reference"] = _text(obj["reference"], "reference")
    return row


def _plain(obj: dict) -> dict:
    return {"text": _text(obj["text"], "text")}


def _preference(obj: dict) -> dict:
    """Prompt + chosen becomes the chat row (SFT on the chosen answer); rejected is kept."""
    if "messages" in obj:
        prompt = _messages(obj["messages"])
    elif isinstance(obj.get("prompt"), list):
        prompt = _messages(obj["prompt"], "prompt")
    elif "prompt" in obj:
        prompt = [{"role": "user", "content": _text(obj["prompt"], "prompt")}]
    else:
        prompt = []
    chosen, rejected = _answer(obj["chosen"], "chosen", prompt), _answer(obj["rejected"], "rejected", prompt)
    return {"messages": _with_system(obj, prompt + chosen), "rejected": rejected}


def _answer(value, what: str, prompt: list[dict]) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list):
        raise _RowError(f"{what} must be a string or a list of messages, got a JSON {_kind(value)}")
    msgs = _messages(value, what)
    if msgs[: len(prompt)] == prompt:  # UltraFeedback style: the answer repeats the prompt
        msgs = msgs[len(prompt):]
    return msgs


_NORMALISERS = {"chat": _chat, "sharegpt": _sharegpt, "alpaca": _alpaca, "completions": _completions,
                "text": _plain, "preference": _preference, "prompts": _prompts}
