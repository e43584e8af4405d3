"""Data lint: every problem in a dataset, with file and line, before any training step runs.

`check_path(path, recipe, tokenizer)` reads the files (any format `mlxft.data.formats`
reads), then checks roles and role order, empty turns, duplicates and near duplicates
within a split, leakage between splits, system-prompt consistency with the recipe
(the train/inference parity rule), and, given a tokenizer, that the chat template
renders every row with an end-of-turn token after each assistant turn, how many rows
the recipe's max_seq_length truncates and how many supervised tokens that loses.
`train` runs it first and refuses on errors.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mlxft.data.encode import Rendered, Renderer, encode_rendered, eos_ids, fast_tokenizer, load_tokenizer
from mlxft.data.formats import Dataset, Example, Problem, exact_key, load_dataset, near_key  # noqa: F401 (lint API)
from mlxft.data.formats import find_files
from mlxft.errors import DataError, ModelError
from mlxft.files import write_atomic
from mlxft.models.load import cache_dir
from mlxft.recipes import load_recipe

ROLES = ("system", "user", "assistant", "tool")
SPLIT_ORDER = ("train", "valid", "test", "data")


@dataclass
class Report:
    path: str
    problems: list[Problem] = field(default_factory=list)
    stats: dict[str, dict] = field(default_factory=dict)  # split -> numbers for the summary table
    dropped: dict[str, str] = field(default_factory=dict)  # row location -> why --fix drops it
    dataset: Dataset | None = None
    max_seq_length: int | None = None
    notes: list[str] = field(default_factory=list)  # one-line facts printed under the table

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, limit: int = 20) -> str:
        """Errors, then warnings (at most `limit` of each kind; 0 = all), then the summary table."""
        lines = []
        for group in (self.errors, self.warnings):
            shown = Counter()
            for p in group:
                shown[p.code] += 1
                if not limit or shown[p.code] <= limit:
                    lines.append(str(p))
            lines += [f"  ... and {n - limit} more {code} ({'error' if group is self.errors else 'warning'}s)"
                      for code, n in shown.items() if limit and n > limit]
        return "\n".join(lines + [""] + summary_table(self) + self.notes)


def check_path(path, recipe=None, tokenizer=None, fmt: str | None = None,
               required_splits: tuple[str, ...] = ()) -> Report:
    """Lint the dataset at `path` (a file or a folder). `recipe` supplies the system prompt and
    max_seq_length; without a tokenizer the token checks are skipped (and a warning says so)."""
    return check_dataset(load_dataset(Path(path), fmt), path, recipe, tokenizer, required_splits)


def check_dataset(ds: Dataset, path, recipe=None, tokenizer=None, required_splits: tuple[str, ...] = (),
                  keep: dict | None = None) -> Report:
    """`check_path` on a dataset already read. `keep`: filled with each measured row's full
    encoding (location -> Encoded) when the token check tokenizes, so training need not again."""
    report = Report(str(path), dataset=ds)
    report.problems += ds.problems
    for split in required_splits:
        if split not in ds.splits:
            report.problems.append(Problem("error", str(path), f"no {split} split (expected {split}.jsonl)", "split"))
    system = recipe.data.system_prompt if recipe is not None else None
    prompts = recipe is not None and recipe.train.method == "grpo"  # GRPO learns from prompts, not answers
    for split, rows in ds.splits.items():
        check_rows(rows, report, prompts)
        report.stats[split] = {"rows": len(rows)}
    check_duplicates(ds, report)
    check_usable(ds, report)
    check_system_prompts(ds, report, system)
    if tokenizer is not None:
        report.max_seq_length = recipe.train.max_seq_length if recipe is not None else None
        for split, rows in ds.splits.items():
            report.stats[split].update(check_tokens(rows, tokenizer, system, report.max_seq_length, report, keep))
    else:
        report.problems.append(Problem("warning", str(path), "no tokenizer: template and length checks skipped", "tokens"))
    _count_problems(report)
    report.problems.sort(key=lambda p: p.severity != "error")  # stable: errors first, file order kept
    return report


# ---------------------------------------------------------------- row structure


def check_rows(rows: list[Example], report: Report, prompts: bool = False) -> None:
    for ex in rows:
        errors, warnings = validate_row(ex.row, prompts)
        for msg in errors:
            report.problems.append(Problem("error", ex.where, msg, "structure"))
            report.dropped.setdefault(ex.where, msg)
        report.problems += [Problem("warning", ex.where, msg, "structure") for msg in warnings]


def check_usable(ds: Dataset, report: Report) -> None:
    """Rows were read, but every one has an error: there is nothing to train on (never "OK to train")."""
    rows = [ex for split in ds.splits.values() for ex in split]
    if rows and all(ex.where in report.dropped for ex in rows):
        report.problems.append(Problem("error", report.path, f"no usable rows: each of the {len(rows)} rows has "
                                       "an error (listed above)", "no-rows"))


def validate_row(row: dict, prompts: bool = False) -> tuple[list[str], list[str]]:
    """(errors, warnings) for one normalised row: roles, empty turns, role order, an assistant turn.
    `prompts` (GRPO): a row is a prompt to sample answers for: it needs a user turn, no answer."""
    if "text" in row:
        if prompts:
            return ["a plain text row has no prompt: GRPO needs chat rows with a user turn, or {\"prompt\": ...}"], []
        return ([] if row["text"].strip() else ["empty text"]), []
    messages = row["messages"]
    if not messages:
        return ["conversation has no messages"], []
    errors = [e for i, m in enumerate(messages) for e in _message_errors(i, m)]
    if errors:
        return errors, []
    if prompts:
        if not any(m["role"] == "user" for m in messages):
            return ["no user turn: GRPO samples answers to the last user message"], []
        order = _order_error(messages)
        return ([order] if order else []), []
    if not any(m["role"] == "assistant" for m in messages):
        return ["conversation has no assistant turn (nothing to learn)"], []
    order = _order_error(messages)
    if order:
        return [order], []
    if "rejected" in row:  # a preference pair (DPO/ORPO): the rejected answer must be a real alternative
        pair = _pair_errors(messages, row["rejected"])
        if pair:
            return pair, []
    if messages[-1]["role"] != "assistant":
        return [], [f"ends with a {messages[-1]['role']} message, which is never learned"]
    return [], []


def _pair_errors(messages: list[dict], rejected) -> list[str]:
    """A pair's answers are what follows the prompt's last user turn: both present, well formed, different."""
    if isinstance(rejected, str):
        rejected = [{"role": "assistant", "content": rejected}]
    if not isinstance(rejected, list) or not rejected or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in rejected):
        return ["rejected must be a non-empty string or list of {\"role\", \"content\"} messages"]
    if rejected[0]["role"] != "assistant" or any(m["role"] not in ("assistant", "tool") for m in rejected):
        return [f"rejected must be an assistant answer (roles: {', '.join(m['role'] for m in rejected)})"]
    empty = [i for i, m in enumerate(rejected) if not m["content"].strip() and not m.get("tool_calls")]
    if empty:
        return [f"rejected[{empty[0]}]: empty content"]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    chosen = messages[users[-1] + 1:] if users else []
    if not chosen:
        return ["chosen answer is missing (nothing follows the prompt's last user turn)"]

    def answer(msgs):
        return [(m["role"], m["content"].strip(), json.dumps(m.get("tool_calls"), sort_keys=True)) for m in msgs]

    if answer(chosen) == answer(rejected):
        return ["chosen and rejected are the same answer: there is nothing to prefer"]
    return []


def _message_errors(i: int, m: dict) -> list[str]:
    role = m["role"]
    if role not in ROLES:
        hint = f" (did you mean '{role.lower()}'?)" if role.lower() in ROLES else f"; roles are {', '.join(ROLES)}"
        return [f"messages[{i}]: unknown role '{role[:40]}'{hint}"]
    calls = m.get("tool_calls")
    if calls is not None and (role != "assistant" or not _valid_tool_calls(calls)):
        return [f"messages[{i}]: tool_calls must be a list of {{\"function\": {{\"name\": ..., \"arguments\": ...}}}} "
                "on an assistant message"]
    if not m["content"].strip() and not calls:
        return [f"messages[{i}] ({role}): empty content"]
    return []


def _valid_tool_calls(calls) -> bool:
    return isinstance(calls, list) and bool(calls) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        for c in calls)


def _order_error(messages: list[dict]) -> str | None:
    """System only first; user and assistant alternate; tool results follow an assistant tool call."""
    prev, calls_open = None, False
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i != 0:
            return f"wrong role order: system message at messages[{i}]; only the first message may be system"
        if role == "user" and prev == "user":
            return f"wrong role order: two user messages in a row (messages[{i - 1}], messages[{i}])"
        if role == "assistant" and prev not in ("user", "tool"):
            return f"wrong role order: messages[{i}] is assistant after {prev or 'nothing'}; a user turn must come first"
        if role == "tool" and not calls_open:
            return f"wrong role order: messages[{i}] is a tool result with no assistant tool call before it"
        calls_open = (role == "assistant" and bool(m.get("tool_calls"))) or (role == "tool" and calls_open)
        prev = role
    return None


# ---------------------------------------------------------------- duplicates, leakage, system prompts


def check_duplicates(ds: Dataset, report: Report) -> None:
    """Duplicates within a split are warnings (--fix drops the exact ones); a row of valid/test that
    is also in an earlier split is leakage, an error: the eval would score memorised rows."""
    first_near: dict[str, tuple[str, str]] = {}  # near key -> (split, where) of its first row
    splits = sorted(ds.splits, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9)
    for split in splits:
        seen_exact: dict[str, str] = {}
        for ex in ds.splits[split]:
            if ex.where in report.dropped:
                continue
            exact, near = ex.exact, ex.near
            if exact in seen_exact:
                _drop(report, "warning", ex.where, f"exact duplicate of {seen_exact[exact]}", "duplicate")
                continue
            seen_exact[exact] = ex.where
            other = first_near.get(near)
            if other is None:
                first_near[near] = (split, ex.where)
            elif other[0] == split:
                report.problems.append(Problem("warning", ex.where, f"near duplicate of {other[1]} "
                                               "(same text ignoring case, punctuation, spacing)", "near-duplicate"))
            else:
                _drop(report, "error", ex.where, f"leakage: this {split} row is also in {other[0]} ({other[1]})",
                      "leakage")


def _drop(report: Report, severity: str, where: str, message: str, code: str) -> None:
    report.problems.append(Problem(severity, where, message, code))
    report.dropped.setdefault(where, message)


def check_system_prompts(ds: Dataset, report: Report, recipe_prompt: str | None) -> None:
    """Train and inference must see one system prompt: rows without one get the recipe's at both."""
    prompts: Counter = Counter()
    first: dict[str, str] = {}
    for rows in ds.splits.values():
        for ex in rows:
            msgs = ex.row.get("messages") or []
            if msgs and msgs[0].get("role") == "system":
                prompts[msgs[0]["content"]] += 1
                first.setdefault(msgs[0]["content"], ex.where)
    if len(prompts) > 1:
        shown = "; ".join(f"{n} rows: {json.dumps(p[:50])} (first at {first[p]})" for p, n in prompts.most_common(3))
        report.problems.append(Problem("warning", report.path, f"{len(prompts)} different system prompts ({shown}); "
                                       "inference uses one, so the model sees a prompt it was not trained on",
                                       "system-prompt"))
    differing = {p: n for p, n in prompts.items() if recipe_prompt and p != recipe_prompt}
    if differing:
        n, p = sum(differing.values()), next(iter(differing))
        report.problems.append(Problem("warning", first[p], f"{n} rows carry a system prompt different from the "
                                       f"recipe's data.system_prompt ({json.dumps(recipe_prompt[:50])}); generate/chat "
                                       "use the recipe's. Drop it from the rows or set data.system_prompt to match",
                                       "system-prompt"))


# ---------------------------------------------------------------- tokens


# Bump when check_tokens' rules change: cached results of older rules are then ignored.
TOKEN_CHECK_VERSION = 1


def check_tokens(rows: list[Example], tokenizer, system: str | None, max_len: int | None, report: Report,
                 keep: dict | None = None) -> dict:
    """Render every clean row, tokenize in batches, and measure lengths against max_len.

    The result depends only on the rows, the tokenizer (vocabulary + chat template), the
    system prompt and max_len, so it is cached under a hash of all four: `data prepare`
    measures the rows it writes, and the `data check` / `train` that follow on the same
    rows reuse it instead of rendering and tokenizing them again. Where it does tokenize, `keep`
    (optional) receives each row's full encoding by its location.
    """
    live = [ex for ex in rows if ex.where not in report.dropped]
    key = _token_cache_key(live, tokenizer, system, max_len)
    cached = _cache_load(key)
    if cached is None:
        *cached, encoded = _measure_tokens(live, tokenizer, system, max_len)
        _cache_save(key, cached)
        if keep is not None:
            keep.update((live[i].where, enc) for i, enc in encoded.items())
    stats, found = cached
    for i, severity, message, code in found:
        if severity == "error":
            _drop(report, severity, live[i].where, message, code)
        else:
            report.problems.append(Problem(severity, live[i].where, message, code))
    return stats


def _measure_tokens(live: list[Example], tokenizer, system, max_len, chunk: int = 2048) -> tuple[dict, list, dict]:
    """(stats, problems as (row index, severity, message, code), {row index: full encoding}) for
    rows that passed the earlier checks."""
    found: list[tuple[int, str, str, str]] = []
    good: list[tuple[int, Rendered]] = []
    render = Renderer(tokenizer, system)
    # Rendering is Python; the Rust tokenizer releases the GIL, so chunk n is tokenized
    # on a second thread while chunk n+1 renders.
    with ThreadPoolExecutor(1) as pool:
        pending = []
        for lo in range(0, len(live), chunk):
            part = []
            for i, ex in enumerate(live[lo : lo + chunk], lo):
                try:
                    rendered = render(ex.row)
                    _check_tools_rendered(ex.row, rendered.text)
                except DataError as e:
                    found.append((i, "error", str(e), "render"))
                    continue
                part.append((i, rendered))
            good += part
            pending.append(pool.submit(encode_rendered, tokenizer, [r for _, r in part]))
        encoded = [enc for job in pending for enc in job.result()]
    eos = sorted(eos_ids(tokenizer))
    lengths, supervised, lost, truncated = [], 0, 0, 0
    for (i, rendered), enc in zip(good, encoded):
        learned = enc.ids[enc.mask]
        learned_eos = sum(int(np.count_nonzero(learned == e)) for e in eos)
        if not rendered.plain and learned_eos < len(rendered.turns):
            found.append((i, "error", "an assistant turn has no end-of-turn token after rendering, so the model "
                          "would never learn to stop (check the chat template and eos_token)", "end-of-turn"))
        lengths.append(len(enc.ids))
        supervised += int(enc.mask.sum())
        if max_len and len(enc.ids) > max_len:
            truncated += 1
            lost += int(enc.mask[max_len:].sum())
            if not enc.mask[:max_len].any():
                found.append((i, "warning", f"{len(enc.ids)} tokens: truncating to max_seq_length={max_len} "
                              "leaves nothing to learn", "truncation"))
    stats = {"tokens": int(sum(lengths)), "supervised": supervised, "truncated": truncated,
             "supervised_lost": lost, "max_tokens": max(lengths, default=0), "lengths": lengths}
    return stats, found, {i: enc for (i, _), enc in zip(good, encoded)}


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of everything that decides how rows render and tokenize (None: cannot tell, do not cache)."""
    fp = getattr(tokenizer, "_mlxft_fingerprint", None)
    if fp is not None:
        return fp
    fast = fast_tokenizer(tokenizer)
    if fast is None:
        return None
    h = hashlib.sha256(fast.to_str().encode())
    for part in (getattr(tokenizer, "chat_template", None), sorted(eos_ids(tokenizer)),
                 getattr(tokenizer, "special_tokens_map", None)):
        h.update(b"\x00" + json.dumps(part, sort_keys=True, default=str).encode())
    fp = h.hexdigest()
    try:
        tokenizer._mlxft_fingerprint = fp
    except AttributeError:
        pass
    return fp


def _token_cache_key(live: list[Example], tokenizer, system, max_len) -> str | None:
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None or os.environ.get("MLXFT_NO_CHECK_CACHE"):
        return None
    h = hashlib.sha256(json.dumps([TOKEN_CHECK_VERSION, fp, system, max_len]).encode())
    for ex in live:
        h.update(ex.exact.encode())
    return h.hexdigest()


def _cache_path(key: str) -> Path:
    return cache_dir() / "checks" / f"{key}.json"


def _cache_load(key: str | None):
    if key is None:
        return None
    try:
        data = json.loads(_cache_path(key).read_text())
        return data["stats"], [tuple(p) for p in data["found"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: measure again


def _cache_save(key: str | None, result, keep: int = 64) -> None:
    """Best effort (a read-only cache folder only costs speed); the oldest entries beyond `keep` go."""
    if key is None:
        return

    path = _cache_path(key)
    try:
        write_atomic(path, json.dumps({"stats": result[0], "found": result[1]}))
        entries = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-keep]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def _check_tools_rendered(row: dict, text: str) -> None:
    """A template without tool support renders tool calls as nothing: that row would teach silence."""
    for m in row.get("messages", []):
        names = [c["function"]["name"] for c in m.get("tool_calls") or []]
        missing = [n for n in names if n not in text]
        if missing or (m["role"] == "tool" and m["content"].strip() not in text):
            what = f"tool call {missing[0]!r}" if missing else "a tool result"
            raise DataError(f"the chat template drops {what}: it does not support tool calls")


# ---------------------------------------------------------------- summary


def _count_problems(report: Report) -> None:
    by_file = {str(f): split for split, files in _split_files(report.dataset).items() for f in files}
    for stats in report.stats.values():
        stats.update(errors=0, warnings=0)
    for p in report.problems:
        split = next((s for f, s in by_file.items() if p.where.startswith(f)), None)
        if split in report.stats:
            report.stats[split]["errors" if p.severity == "error" else "warnings"] += 1


def _split_files(ds: Dataset) -> dict[str, list[str]]:
    roots = {str(f.parent) for f in ds.files}
    out: dict[str, list[str]] = {}
    for root in roots:
        try:
            for split, files in find_files(Path(root)).items():
                out.setdefault(split, []).extend(str(f) for f in files if f in ds.files)
        except DataError:
            pass
    if len(ds.files) == 1:  # a single file is its own split whatever its folder holds
        out = {next(iter(ds.splits)): [str(ds.files[0])]}
    return out


def summary_table(report: Report) -> list[str]:
    cols = ("rows", "errors", "warnings", "tokens", "supervised", "truncated", "supervised_lost")
    head = f"{'split':8}" + "".join(f"{c.replace('_', ' '):>{max(9, len(c) + 2)}}" for c in cols)
    lines = [head, "-" * len(head)]
    for split in sorted(report.stats, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 9):
        st = report.stats[split]
        lines.append(f"{split:8}" + "".join(f"{st.get(c, '-'):>{max(9, len(c) + 2)}}" for c in cols))
    lengths = [n for st in report.stats.values() for n in st.get("lengths", [])]
    if lengths:
        lines += ["", f"token lengths (max_seq_length={report.max_seq_length}):"] + histogram(lengths, report.max_seq_length)
    verdict = (f"{len(report.errors)} errors, {len(report.warnings)} warnings: "
               + ("OK to train" if report.ok else "fix the errors (or write a cleaned copy with --fix OUT)"))
    return lines + ["", verdict]


def histogram_counts(lengths: list[int], max_len: int | None, bins: int = 8) -> list[tuple[str, int]]:
    """(range label, rows) per bin of token lengths up to max_len, then rows over it ("cut" by truncation)."""
    top = max_len or max(lengths)
    edges = [round(top * i / bins) for i in range(bins + 1)]
    counts = np.histogram(np.minimum(lengths, top), bins=edges)[0].tolist()
    over = sum(n > top for n in lengths)
    labels = [f"{edges[i] + (i > 0)}-{edges[i + 1]}" for i in range(bins)] + [f">{top} (cut)"]
    counts[-1] -= over  # rows over the limit were clipped into the last bin; show them apart
    counts.append(over)
    return list(zip(labels, counts))


def histogram(lengths: list[int], max_len: int | None, bins: int = 8, width: int = 40) -> list[str]:
    rows = histogram_counts(lengths, max_len, bins)
    peak = max(n for _, n in rows) or 1
    return [f"  {lab:>14} {n:>8} {'#' * round(width * n / peak)}" for lab, n in rows]


def recipe_and_tokenizer(recipe_name: str, model: str | None = None, overrides=()):
    """The recipe and its model's tokenizer, or (recipe, None, why) when the tokenizer is unavailable."""

    if model:
        overrides = (*overrides, f"model.source={model}")
    recipe = load_recipe(recipe_name, overrides=overrides)
    try:
        return recipe, load_tokenizer(recipe.model.source)[0], None
    except ModelError as e:
        return recipe, None, str(e)
