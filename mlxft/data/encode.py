"""Chat data in, token ids and loss masks out.

Loss is on every assistant turn (not only the last), excluding role headers and
including each turn's end-of-turn token. The prompt ids built here for a
conversation are the same ids `generate`/`chat` build at inference (`prompt_ids`),
which is the template-parity rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

from mlxft.data.formats import load_dataset
from mlxft.errors import DataError, ModelError
from mlxft.models.load import BUILTIN_PREFIX, DEFAULT_CHAT_TEMPLATE, backend, resolve_model


def read_chat_jsonl(path: Path, need_role: str = "assistant", allow_text: bool = False) -> list[dict]:
    """Read a chat JSONL file: one {"messages": [...]} object per line, each with a `need_role` turn
    (training data needs an answer; eval prompts need a user turn). With `allow_text`, {"text": ...}
    rows are kept as they are (perplexity suites). Any problem raises DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if allow_text and isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"].strip():
            rows.append(row)
            continue
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            want = '{"messages": [...]} or {"text": ...}' if allow_text else '{"messages": [{"role": ..., "content": ...}, ...]}'
            raise DataError(f"{path}:{lineno}: expected {want}")
        if not any(m["role"] == need_role for m in messages):
            raise DataError(f"{path}:{lineno}: conversation has no {need_role} turn")
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines); expected one JSON object per line")
    return rows


def load_splits(data_dir: Path, splits=("train", "valid")) -> dict[str, list[dict]]:
    """Normalised rows of each split in `data_dir`: train/valid/test in any format mlxft reads.

    Chat JSONL is read as is; ShareGPT, Alpaca, completions, text and preference files
    (JSONL, JSON array, CSV/TSV) are normalised on the way. Any error stops the load.
    """

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data folder not found: {data_dir}")
    ds = load_dataset(data_dir)
    missing = [s for s in splits if s not in ds.splits]
    if missing:
        raise DataError(f"{data_dir}: no {'/'.join(missing)} split (expected {missing[0]}.jsonl)")
    errors = [p for p in ds.problems if p.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more; run: mlxft data check {data_dir})" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more}")
    return {s: [e.row for e in ds.splits[s]] for s in splits}


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Prepend the recipe's system prompt when a conversation has none."""
    if system_prompt and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _render(tokenizer, messages, add_generation_prompt: bool, tools=None) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True,
                                              add_generation_prompt=add_generation_prompt))


def prompt_ids(tokenizer, messages: list[dict], system_prompt: str | None = None) -> list[int]:
    """Token ids of the prompt for the next assistant turn, exactly as in training."""
    return _render(tokenizer, with_system_prompt(messages, system_prompt), add_generation_prompt=True)


@dataclass
class Encoded:
    ids: np.ndarray  # int32 (T,)
    mask: np.ndarray  # bool (T,): True where ids[t] is a supervised target


def encode_conversation(tokenizer, messages: list[dict], max_length: int | None = None, tools=None) -> Encoded:
    """Render a conversation and mark every assistant turn's tokens as supervised.

    For assistant turn i the supervised span runs from the end of the prompt
    rendered for it (messages[:i] + generation prompt) to the end of the rendering
    of messages[:i+1], cut just after the first end-of-turn token in it (so the
    newline a template puts after the end token is not learned).
    """
    full = _render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans = [
        (
            len(_render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)),
            len(_render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)),
        )
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    return masked_encoding(tokenizer, full, spans, False, max_length)


def encode_rows(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int | None) -> list[Encoded]:
    """Encode normalised rows as `encode_conversation` does, rendering once and tokenizing in batches."""
    render = Renderer(tokenizer, system_prompt)
    rendered = []
    for i, row in enumerate(rows):
        try:
            rendered.append(render(row))
        except DataError as e:
            raise DataError(f"row {i + 1}: {e}") from None
    return encode_rendered(tokenizer, rendered, max_length)


# ---------------------------------------------------------------- batched encoding


@dataclass
class Rendered:
    """A row as text: the full rendering, plus per assistant turn the prompt and the text through it."""

    text: str
    turns: list[tuple[str, str]]
    plain: bool = False  # a {"text": ...} row: every token is supervised, then end-of-sequence


def render_row(tokenizer, row: dict, system_prompt: str | None = None) -> Rendered:
    """Render a normalised row with the chat template; DataError if the template cannot."""
    if "text" in row:
        return Rendered(row["text"], [], plain=True)
    messages, tools = with_system_prompt(row["messages"], system_prompt), row.get("tools") or None

    def text(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=gen)

    try:
        full = text(messages, False)
        last = len(messages) - 1
        turns = [(text(messages[:i], True), full if i == last else text(messages[: i + 1], False))
                 for i, m in enumerate(messages) if m["role"] == "assistant"]
        return Rendered(full, turns)
    except Exception as e:  # jinja raises TemplateError, TypeError, ...: all mean "cannot render"
        raise DataError(f"the chat template cannot render this row ({type(e).__name__}: {e})") from None


_SENTINEL = re.compile("\x00MLXFT(\\d+)\x00")


class Renderer:
    """`render_row` with two template calls per row instead of 1 + 2 per assistant turn.

    `render_row` renders each assistant turn's prompt and the text through it separately,
    the only way that is right for any template. Most templates render a conversation as
    its messages one after another, so those prefixes are cuts of the full text: this
    renders the row once with a marker in place of each assistant message's content and
    once as it is, and cuts. It is used only where it is provably the same: the template
    must give identical results both ways on a probe conversation and on the first
    `probe_rows` rows (else every row takes the slow path), and on every later row the
    markers filled with the real contents must give exactly the real full text (else that
    row takes the slow path).
    """

    def __init__(self, tokenizer, system_prompt: str | None = None, probe_rows: int = 16):
        self.tokenizer, self.system = tokenizer, system_prompt
        self.probe_rows = probe_rows
        self.fast: bool | None = None  # None while probing
        self.closing: str | None = None  # text after an assistant message's content, e.g. "<|im_end|>\n"
        if not self._learn_closing():
            self.fast = False

    def __call__(self, row: dict) -> Rendered:
        if self.fast is False or "text" in row:
            return render_row(self.tokenizer, row, self.system)
        if self.fast is None:  # probing: both ways, and they must agree
            slow = render_row(self.tokenizer, row, self.system)
            self.probe_rows -= 1
            if self._cut(row) != slow:
                self.fast = False
            elif self.probe_rows <= 0:
                self.fast = True
            return slow
        return self._cut(row) or render_row(self.tokenizer, row, self.system)

    def _text(self, messages, gen: bool, tools=None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen)

    def _learn_closing(self) -> bool:
        probe = [{"role": "user", "content": "Probe one?"}, {"role": "assistant", "content": "Probe two."},
                 {"role": "user", "content": "Probe three?"}, {"role": "assistant", "content": "Probe four."}]
        try:
            r = render_row(self.tokenizer, {"messages": probe}, self.system)
        except DataError:
            return False
        prompt, through = r.turns[0]
        if not through.startswith(prompt + "Probe two."):
            return False
        self.closing = through[len(prompt) + len("Probe two."):]
        return self._cut({"messages": probe}) == r

    def _cut(self, row: dict) -> Rendered | None:
        """The row rendered by cutting one marked rendering; None when that is not exactly right for it."""
        messages, tools = with_system_prompt(row["messages"], self.system), row.get("tools") or None
        if any("\x00MLXFT" in m["content"] for m in messages):
            return None
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        marked = [dict(m, content=f"\x00MLXFT{k}\x00") if m["role"] == "assistant" else m
                  for k, m in enumerate(messages)]
        try:
            pieces = _SENTINEL.split(self._text(marked, False, tools))
            full = self._text(messages, False, tools)
        except Exception:
            return None  # the slow path reports the template error
        # pieces = text, index, text, index, ...: each assistant message exactly once, in order
        if [int(k) for k in pieces[1::2]] != assistant:
            return None
        text, starts, ends = [], [], []
        for j, part in enumerate(pieces):
            if j % 2:
                starts.append(sum(map(len, text)))
                text.append(messages[int(part)]["content"])
                ends.append(sum(map(len, text)))
            else:
                text.append(part)
        if "".join(text) != full:
            return None
        turns = []
        for n, (start, end) in enumerate(zip(starts, ends)):
            if n == len(starts) - 1 and assistant[-1] == len(messages) - 1:
                through = full
            elif full.startswith(self.closing, end):
                through = full[: end + len(self.closing)]
            else:
                return None
            turns.append((full[:start], through))
        return Rendered(full, turns)


def fast_tokenizer(tokenizer):
    fast = getattr(getattr(tokenizer, "_tokenizer", None), "_tokenizer", None)
    return fast if fast is not None and hasattr(fast, "encode_batch") else None


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as apply_chat_template(tokenize=True) gives them, in one batch."""
    fast = fast_tokenizer(tokenizer)
    if fast is not None:  # the Rust tokenizer: parallel batch encode
        return [e.ids for e in fast.encode_batch(texts, add_special_tokens=False)]
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def eos_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])


def encode_rendered(tokenizer, rendered: list[Rendered], max_length: int | None = None,
                    chunk: int = 4096) -> list[Encoded]:
    """Ids and masks for rendered rows (same rule as `encode_conversation`), tokenized in chunks.

    Only the full texts are tokenized: a turn boundary is the count of tokens before its
    character offset when a token starts exactly there (the prefix then tokenizes to the
    same ids); otherwise, or when a prefix is not a prefix of the full text, the prefix
    itself is tokenized, as `encode_conversation` does.
    """
    fast = fast_tokenizer(tokenizer)
    out = []
    for lo in range(0, len(rendered), chunk):
        part = rendered[lo : lo + chunk]
        if fast is None:
            encodings = [None] * len(part)
            fulls = encode_texts(tokenizer, [r.text for r in part])
        else:
            encodings = fast.encode_batch([r.text for r in part], add_special_tokens=False)
            fulls = [e.ids for e in encodings]
        slow: list[str] = []  # prefixes whose boundary does not fall on a token start
        plans = []
        for r, enc in zip(part, encodings):
            plan = []
            for prefix in (x for turn in r.turns for x in turn):
                k = _token_starting_at(enc, len(prefix)) if enc is not None and r.text.startswith(prefix) else None
                if k is None and len(prefix) == len(r.text) and r.text == prefix:
                    k = len(enc.ids) if enc is not None else None
                if k is None:
                    slow.append(prefix)
                plan.append(k)
            plans.append(plan)
        slow_ids = iter(encode_texts(tokenizer, slow)) if slow else iter(())
        for r, full, plan in zip(part, fulls, plans):
            counts = [k if k is not None else len(next(slow_ids)) for k in plan]
            spans = list(zip(counts[0::2], counts[1::2]))
            out.append(masked_encoding(tokenizer, full, spans, r.plain, max_length))
    return out


def _token_starting_at(enc, pos: int) -> int | None:
    """Index of the token whose first character is at `pos` (None when a token straddles it)."""
    k = enc.char_to_token(pos)
    return k if k is not None and enc.token_to_chars(k)[0] == pos else None


def masked_encoding(tokenizer, full: list[int], spans, plain: bool, max_length: int | None) -> Encoded:
    """A tokenized row's ids and loss mask: the token `spans` supervised, each cut just after its
    end-of-turn token (a plain text row: every token, plus end-of-sequence); cut at `max_length`."""
    eos = eos_ids(tokenizer)
    if plain:
        full = full + [tokenizer.eos_token_id]
        mask = np.ones(len(full), dtype=bool)
    else:
        mask = np.zeros(len(full), dtype=bool)
        for start, end in spans:
            for t in range(start, end):
                if full[t] in eos:  # stop after the end-of-turn token, as encode_conversation does
                    end = t + 1
                    break
            mask[start:end] = True
    ids = np.asarray(full, dtype=np.int32)
    if max_length is not None and len(ids) > max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return Encoded(ids, mask)


def load_tokenizer(source: str):
    """The tokenizer `load_base(source)` would give (with DEFAULT_CHAT_TEMPLATE when the model has none),
    without loading the weights. Returns (tokenizer, used_default_template)."""

    gguf_like = source.startswith(BUILTIN_PREFIX) or source.endswith(".gguf")
    path = resolve_model(source, dequantize=("fp32" if backend() == "cpu" else "bf16") if gguf_like else None)
    try:
        config = json.loads((path / "config.json").read_text())
        tokenizer = mlx_load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except Exception as e:

        raise ModelError(f"could not load the tokenizer in {path}: {type(e).__name__}: {e}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer._tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        return tokenizer, True
    return tokenizer, False


def pad_rows(rows: list[Encoded], skip: int | list[int] = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad rows for next-token training: (inputs, targets, supervised mask), each (B, S), where
    S is the longest row minus 1 minus `skip` (leading tokens left out: a shared prefix; one per row
    or one for all), rounded up to a multiple of `multiple`. Padding is token 0, unsupervised."""
    skips = [skip] * len(rows) if isinstance(skip, int) else list(skip)
    S = max(len(r.ids) - 1 - k for r, k in zip(rows, skips))
    S = -(-S // multiple) * multiple
    inputs = np.zeros((len(rows), S), dtype=np.int32)
    targets = np.zeros((len(rows), S), dtype=np.int32)
    mask = np.zeros((len(rows), S), dtype=bool)
    for i, (r, k) in enumerate(zip(rows, skips)):
        n = len(r.ids) - 1 - k
        inputs[i, :n], targets[i, :n], mask[i, :n] = r.ids[k:-1], r.ids[k + 1 :], r.mask[k + 1 :]
    return inputs, targets, mask
