"""Chat data in, token ids and loss masks out.

Loss is on every assistant turn (not only the last), excluding role headers and
including each turn's end-of-turn token. The prompt ids built here for a
conversation are the same ids `generate`/`chat` build at inference (`prompt_ids`),
which is the template-parity rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.errors import DataError

SPLITS = ("train", "valid", "test")


def read_chat_jsonl(path: Path) -> list[dict]:
    """Read a chat JSONL file: one {"messages": [...]} object per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise DataError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: conversation has no assistant turn")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_splits(data_dir: Path, splits=("train", "valid")) -> dict[str, list[dict]]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    return {s: read_chat_jsonl(data_dir / f"{s}.jsonl") for s in splits}


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the recipe's system prompt when a conversation has none."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _render(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    )


def prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt for the next assistant turn, exactly as in training."""
    return _render(tokenizer, with_system_prompt(messages, system_prompt), add_generation_prompt=True)


@dataclass
class Encoded:
    ids: np.ndarray  # int32 (T,)
    mask: np.ndarray  # bool (T,): True where ids[t] is a supervised target


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None) -> Encoded:
    """Render a conversation and mark every assistant turn's tokens as supervised.

    For assistant turn i the supervised span runs from the end of the prompt
    rendered for it (messages[:i] + generation prompt) to the end of the rendering
    of messages[:i+1], cut just after the first end-of-turn token in it (so the
    newline a template puts after the end token is not learned).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False)
    mask = np.zeros(len(full), dtype=bool)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False))
        for t in range(start, end):
            if full[t] in eos:
                end = t + 1
                break
        mask[start:end] = True
    ids = np.asarray(full, dtype=np.int32)
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return Encoded(ids, mask)


def encode_rows(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int) -> list[Encoded]:
    return [
        encode_conversation(tokenizer, with_system_prompt(r["messages"], system_prompt), max_length) for r in rows
    ]
