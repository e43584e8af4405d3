"""`mlxft synth`: teacher-to-student training data, every row checked before it is kept.

    mlxft synth --teacher builtin:smollm2-135m-instruct --seeds topics.txt --n 200 out/
    mlxft synth --teacher http://127.0.0.1:8080/v1 --seeds prompts.jsonl --mode answer --n 100 out/

Each attempt renders a seed (a topic line or an example row; cycled) through a jinja2
template into the teacher's prompt. In generate mode the teacher writes a whole example
(a JSON object); in answer mode it answers the seed's prompt and the row is that prompt
plus its answer. Every candidate row then passes the data checks of `mlxft data check`
(schema, duplicates and near duplicates, leakage against eval/test rows, also by prompt
alone), optional eval-suite scorers and an optional LLM-judge threshold.

OUT/synth.jsonl holds the kept rows, each with provenance in `metadata.synth` (teacher,
template hash, seed, attempt); OUT/rejects.jsonl holds the rest with the reason;
OUT/manifest.json the settings and counts. Every attempt is appended (and fsynced) to one
of the two files, so rerunning the same command continues after the last recorded attempt
with the same dedupe state.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import jinja2
from tqdm import tqdm

from mlxft.data.check import near_key, validate_row
from mlxft.data.formats import Problem, detect_row, normalise_row, read_records
from mlxft.data.synth_checks import Reject, RowChecks, RowFilter, SuiteFilter
from mlxft.data.teacher import Reply, TeacherSampling, open_teacher
from mlxft.errors import ConfigError, DataError, ModelError
from mlxft.files import write_atomic
from mlxft.recipes import load_recipe, resolve_data_dir

ROWS, REJECTS, MANIFEST = "synth.jsonl", "rejects.jsonl", "manifest.json"
MODES = ("generate", "answer")
TEMPLATES = {"generate": "synth_default.j2", "answer": "synth_answer.j2"}
JUDGE_TEMPLATE = "synth_judge.j2"
_ROW_FORMATS = ("chat", "sharegpt", "alpaca", "completions")  # a teacher reply in these shapes is a row
_INFO_ONLY = ("seeds", "template")  # file paths: the same files by another path are the same settings (hashes decide)
_SEED_KEYS = ("topic", "prompt", "text", "seed", "question", "instruction")  # a non-row JSON seed's text


@dataclass
class SynthOptions:
    seeds: Path
    n: int  # rows to keep
    out: Path
    mode: str = "generate"
    template: Path | None = None  # None: the packaged template of the mode
    system: str | None = None  # the student's system prompt, put first in every row
    against: tuple[Path, ...] = ()  # eval/test data a row must not leak into (a folder: its valid and test splits)
    sampling: TeacherSampling = field(default_factory=TeacherSampling)
    seed: int = 0  # attempt k samples with seed + k (+ its place in a batch)
    max_attempts: int | None = None  # default: 4 x n in generate mode, the number of seeds in answer mode


@dataclass
class SynthResult:
    out: Path
    kept: int
    rejected: int
    attempts: int
    reasons: dict[str, int]
    complete: bool
    resumed_from: int  # attempts already recorded when this call started


# ---------------------------------------------------------------- seeds and templates


@dataclass
class Seed:
    index: int
    where: str  # file:line
    value: object  # as read: a string or a JSON object
    messages: list[dict]  # the normalised conversation of a row seed, [] for a topic
    prompt: str  # the last user message, or the topic text
    answer: str  # the last assistant reply, "" for a topic

    def provenance(self) -> dict:
        return {"index": self.index, "where": self.where, "text": self.prompt[:200]}


def read_seeds(path: str | Path) -> list[Seed]:
    """Seeds from a text file (one topic per non-empty line) or JSONL/JSON/CSV (rows or {"topic": ...})."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"seeds file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".ndjson", ".json", ".csv", ".tsv"):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
        seeds = [Seed(0, f"{path}:{i}", line.strip(), [], line.strip(), "") for i, line in enumerate(lines, 1)
                 if line.strip()]
    else:
        problems: list[Problem] = []
        records = read_records(path, problems)
        errors = [p for p in problems if p.severity == "error"]
        if errors:
            raise DataError(str(errors[0]) + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
        seeds = [_seed(where, obj) for where, obj in records]
    if not seeds:
        raise DataError(f"{path}: no seeds (one topic per line, or one row / {{\"topic\": ...}} per JSON line)")
    for i, s in enumerate(seeds):
        s.index = i
    return seeds


def _seed(where: str, obj) -> Seed:
    if isinstance(obj, str) and obj.strip():
        return Seed(0, where, obj, [], obj.strip(), "")
    fmt = detect_row(obj)
    if fmt in (*_ROW_FORMATS, "preference"):
        problems: list[Problem] = []
        row = normalise_row(obj, fmt, where, problems)
        if row is None:
            raise DataError(str(problems[-1]))
        msgs = row["messages"]
        users = [m["content"] for m in msgs if m["role"] == "user"]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        if not users:
            raise DataError(f"{where}: seed row has no user message")
        return Seed(0, where, obj, msgs, users[-1], answers[-1] if answers else "")
    for key in _SEED_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), str) and obj[key].strip():
            return Seed(0, where, obj, [], obj[key].strip(), "")
    raise DataError(f"{where}: a seed is a string, a chat/Alpaca/ShareGPT/completions row, or an object with one of "
                    f"{', '.join(_SEED_KEYS)}")


@dataclass
class Template:
    template: jinja2.Template
    text: str
    sha256: str
    where: str  # the file, or "packaged NAME"

    def render(self, **variables) -> str:
        try:
            return self.template.render(**variables).strip()
        except jinja2.TemplateError as e:
            raise ConfigError(f"template {self.where}: {e.message}; variables: {', '.join(sorted(variables))}") from None


def load_template(path: str | Path | None, packaged: str) -> Template:
    """A user's jinja2 file, or the packaged one; undefined variables are errors, not empty text."""
    if path is None:

        text, where = (files("mlxft") / "templates" / packaged).read_text(encoding="utf-8"), f"packaged {packaged}"
    else:
        try:
            text, where = Path(path).read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read template {path}: {e}") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        compiled = env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}:{e.lineno}: template syntax error: {e.message}") from None
    return Template(compiled, text, hashlib.sha256(text.encode()).hexdigest(), where)


def teacher_conversation(template: Template, seed: Seed, attempt: int, mode: str, system: str | None) -> list[dict]:
    """What the teacher is asked: the rendered template as the user message (answer mode keeps earlier turns)."""
    text = template.render(prompt=seed.prompt, answer=seed.answer, messages=seed.messages, seed=seed.value,
                           seed_index=seed.index, attempt=attempt, system=system or "")
    if not text:
        raise ConfigError(f"template {template.where} rendered nothing for seed {seed.where}")
    if mode == "answer" and seed.messages:
        context = seed.messages[: _last_user(seed.messages)]
        return [*(m for m in context if m["role"] != "system"), {"role": "user", "content": text}]
    return [{"role": "user", "content": text}]


def _last_user(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


# ---------------------------------------------------------------- replies -> rows


def parse_reply(reply: Reply, seed: Seed, mode: str, system: str | None, asked: str = "") -> dict:
    """The training row a teacher reply makes, or Reject saying why it makes none.

    `asked` is the prompt the teacher got: a generated row that only copies it back (the
    template's placeholders, or the seed example itself) teaches nothing new.
    """
    if reply.truncated:
        raise Reject("truncated", "the teacher stopped at max_tokens, so the reply is probably cut off "
                     "(raise --max-tokens)")
    if mode == "answer":
        prompt = seed.messages[: _last_user(seed.messages) + 1] if seed.messages else \
            [{"role": "user", "content": seed.prompt}]
        messages = [*prompt, {"role": "assistant", "content": reply.text.strip()}]
    else:
        messages = _row_from_json(reply.text)
    if system:
        messages = [{"role": "system", "content": system}, *(m for m in messages if m["role"] != "system")]
    row = {"messages": messages}
    errors, warnings = validate_row(row)
    if errors or warnings:
        raise Reject("schema", (errors or warnings)[0])
    _check_echo(messages, mode, asked)
    return row


def _check_echo(messages: list[dict], mode: str, asked: str) -> None:
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "").strip()
    answer = messages[-1]["content"].strip()
    if near_key({"text": answer}) == near_key({"text": user}):
        raise Reject("echo", "the answer repeats the user message")
    if mode == "generate" and user in asked and answer in asked:
        raise Reject("echo", "the row only copies the teacher's prompt (its placeholders or the seed example)")


def _row_from_json(text: str) -> list[dict]:
    obj = _first_json_object(text)
    if obj is None:
        raise Reject("format", "the reply holds no JSON object (the template asks for {\"user\": ..., \"assistant\": ...})")
    if isinstance(obj.get("user"), str) and isinstance(obj.get("assistant"), str):
        return [{"role": "user", "content": obj["user"]}, {"role": "assistant", "content": obj["assistant"]}]
    fmt = detect_row(obj)
    if fmt not in _ROW_FORMATS:
        raise Reject("format", f"the reply's JSON is not a row (keys: {', '.join(sorted(obj))[:80]}); expected "
                     "user/assistant, messages, conversations, instruction/output or prompt/completion")
    problems: list[Problem] = []
    row = normalise_row(obj, fmt, "reply", problems)
    if row is None:
        raise Reject("schema", problems[-1].message)
    return row["messages"]


def _first_json_object(text: str) -> dict | None:
    """The first JSON object in the text, inside a ``` fence or not."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


# ---------------------------------------------------------------- LLM judge


@dataclass
class Judge:
    """A model scores each candidate 1-10 with a jinja2 rubric; rows under the threshold are rejected."""

    teacher: object
    threshold: float = 7.0
    template: Template | None = None

    def __post_init__(self):
        self.template = self.template or load_template(None, JUDGE_TEMPLATE)

    def scores(self, rows: list[dict], system: str | None) -> list[float | None]:
        convs = []
        for row in rows:
            msgs = row["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            user = next((m["content"] for m in reversed(msgs[:last]) if m["role"] == "user"), "")
            convs.append([{"role": "user", "content": self.template.render(
                user=user, assistant=msgs[last]["content"], messages=msgs, system=system or "")}])
        replies = self.teacher.complete(convs, TeacherSampling(temp=0.0, top_p=1.0, max_tokens=16), seed=0)
        return [parse_score(r.text) for r in replies]

    def settings(self) -> dict:
        return {"judge": self.teacher.name, "threshold": self.threshold, "template_sha256": self.template.sha256}


def parse_score(text: str) -> float | None:
    """The first number in the judge's reply when it is on the 1-10 scale, else None."""
    m = re.search(r"\d+(?:\.\d+)?", text)
    value = float(m.group()) if m else None
    return value if value is not None and 0 <= value <= 10 else None


# ---------------------------------------------------------------- the output folder


class SynthOutput:
    """OUT/synth.jsonl + OUT/rejects.jsonl (one record per attempt, appended and fsynced) + OUT/manifest.json."""

    def __init__(self, out: Path):
        self.root = Path(out)
        self.rows_path, self.rejects_path, self.manifest_path = (self.root / n for n in (ROWS, REJECTS, MANIFEST))
        self._files: list = []
        self.previous: dict = {}  # the manifest a previous run left

    def open(self, settings: dict) -> tuple[list[dict], list[dict]]:
        """Lock OUT, check it was made with the same settings, and return (kept rows, rejects) so far."""
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"{self.root} is a file; synth writes a folder")
        visible = self.root.is_dir() and any(not p.name.startswith(".") for p in self.root.iterdir())
        if visible and not self.manifest_path.is_file():
            raise DataError(f"{self.root} is not empty and has no {MANIFEST}: not an mlxft synth folder; pick a new OUT")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"another mlxft synth is writing {self.root}") from None
        self.previous = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {}
        if self.previous:
            before = self.previous.get("settings", {})
            changed = sorted(k for k in set(before) | set(settings)
                             if k not in _INFO_ONLY and before.get(k) != settings.get(k))
            if changed:
                raise DataError(f"{self.root} was made with other settings ({', '.join(changed)} differ); "
                                "rerun with the same ones to continue, or write to a new OUT")
        rows, rejects = _read_log(self.rows_path), _read_log(self.rejects_path)
        self._files = [open(self.rows_path, "a", encoding="utf-8"), open(self.rejects_path, "a", encoding="utf-8")]
        return rows, rejects

    def append(self, record: dict, kept: bool) -> None:
        f = self._files[0 if kept else 1]
        f.write(json.dumps(record, ensure_ascii=False) + "\n")  # one line per write: a crash leaves at most a partial last line
        f.flush()
        os.fsync(f.fileno())

    def write_manifest(self, manifest: dict) -> None:
        write_atomic(self.manifest_path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")

    def close(self) -> None:
        for f in self._files:
            f.close()
        if getattr(self, "_lock", None):
            self._lock.close()


def _read_log(path: Path) -> list[dict]:
    """Records of a synth log; a half-written last line (killed mid-append) is cut off and redone."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    out = []
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            _attempt(record)  # every record names its attempt: that is what a rerun continues from
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{lineno}: not a record mlxft synth wrote (no JSON with its attempt); "
                            "was the file edited? Restore it or write to a new OUT") from None
        out.append(record)
    return out


# ---------------------------------------------------------------- the loop


def synthesize(opts: SynthOptions, teacher, filters: list[RowFilter] = (), judge: Judge | None = None,
               log=print, progress: bool = True) -> SynthResult:
    """Generate until `opts.n` rows are kept (or the attempts run out); resumable. See the module docstring."""

    if opts.mode not in MODES:
        raise ConfigError(f"unknown mode '{opts.mode}'; one of: {', '.join(MODES)}")
    seeds = read_seeds(opts.seeds)
    template = load_template(opts.template, TEMPLATES[opts.mode])
    checks = RowChecks(tuple(opts.against))
    settings = _settings(opts, teacher, template, filters, judge)
    limit = opts.max_attempts or (len(seeds) if opts.mode == "answer" else 4 * opts.n)
    if opts.mode == "answer":
        limit = min(limit, len(seeds))  # each seed prompt is answered once: a second answer is a duplicate prompt
    out = SynthOutput(opts.out)
    rows, rejects = out.open(settings)
    try:
        for r in rows:
            checks.add(_strip(r), f"attempt {r['metadata']['synth']['attempt']}")
        reasons = Counter(r["reason"] for r in rejects)
        attempt = max((_attempt(r) for r in (*rows, *rejects)), default=-1) + 1
        resumed_from, kept = attempt, len(rows)
        if attempt:
            log(f"resuming {out.root}: {kept} rows kept, {len(rejects)} rejected in {attempt} attempts")
        if not opts.against:
            log("note: no --against eval/test data given: leakage is not checked")
        started = out.previous.get("started") or _now()
        out.write_manifest(_manifest(opts, settings, len(seeds), checks, kept, reasons, attempt, limit, started))
        bar = tqdm(total=opts.n, initial=min(kept, opts.n), desc="synth", unit="row", dynamic_ncols=True,
                   file=sys.stderr, disable=not progress)
        try:
            while kept < opts.n and attempt < limit:
                batch = list(range(attempt, min(attempt + getattr(teacher, "batch_size", 8), limit)))
                for record, ok in _run_batch(batch, seeds, template, teacher, opts, checks, filters, judge, settings):
                    if kept >= opts.n:
                        break  # unrecorded attempts are redone by a later run that asks for more
                    out.append(record, ok)
                    attempt = _attempt(record) + 1
                    kept += ok
                    bar.update(ok)
                    if not ok:
                        reasons[record["reason"]] += 1
                bar.set_postfix(rejected=sum(reasons.values()))
                out.write_manifest(_manifest(opts, settings, len(seeds), checks, kept, reasons, attempt, limit,
                                             started))
        finally:  # also on Ctrl-C or a teacher error: the manifest counts what the files hold
            bar.close()
            out.write_manifest(_manifest(opts, settings, len(seeds), checks, kept, reasons, attempt, limit, started))
        if kept < opts.n:
            top = ", ".join(f"{why} {n}" for why, n in reasons.most_common(4))
            log(f"stopped after {attempt} attempts with {kept} of {opts.n} rows (rejected: {top or 'none'}); "
                f"see {out.rejects_path}; raise --max-attempts or add seeds")
        return SynthResult(out.root, kept, sum(reasons.values()), attempt, dict(reasons), kept >= opts.n, resumed_from)
    finally:
        out.close()


def _attempt(record: dict) -> int:
    return record["metadata"]["synth"]["attempt"] if "messages" in record else record["attempt"]


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "metadata"}


def _run_batch(batch, seeds, template, teacher, opts, checks, filters, judge, settings):
    """(record, kept) for each attempt of the batch, in attempt order."""
    chosen = [seeds[a % len(seeds)] for a in batch]
    convs = [teacher_conversation(template, s, a, opts.mode, opts.system) for a, s in zip(batch, chosen)]
    replies = teacher.complete(convs, opts.sampling, opts.seed + batch[0])
    if len(replies) != len(batch):
        raise ModelError(f"teacher {teacher.name} gave {len(replies)} replies for {len(batch)} prompts")
    outcome: dict[int, tuple[dict | None, Reject | None]] = {}
    for a, seed, reply, conv in zip(batch, chosen, replies, convs):
        row = None
        try:
            row = parse_reply(reply, seed, opts.mode, opts.system, conv[-1]["content"])
            checks.check(row)  # cheap checks first: no filter or judge time on a duplicate
            outcome[a] = (row, None)
        except Reject as e:
            outcome[a] = (row, e)
    for f in filters:  # the first failing filter rejects a row; later filters see only the survivors
        alive = [a for a in batch if outcome[a][1] is None]
        for a, why in zip(alive, _filter_reasons(f, [outcome[a][0] for a in alive]) if alive else []):
            if why is not None:
                outcome[a] = (outcome[a][0], Reject(f"filter:{f.name}", why))
    scores: dict[int, float] = {}
    if judge is not None:
        alive = [a for a in batch if outcome[a][1] is None]
        for a, score in zip(alive, judge.scores([outcome[a][0] for a in alive], opts.system) if alive else []):
            if score is None:
                outcome[a] = (outcome[a][0], Reject("judge", "the judge's reply holds no 1-10 score"))
            elif score < judge.threshold:
                outcome[a] = (outcome[a][0], Reject("judge", f"judge score {score:g} < threshold {judge.threshold:g}"))
            scores[a] = score
    for a, seed, reply in zip(batch, chosen, replies):
        row, rejected = outcome[a]
        if rejected is None:
            try:
                checks.check(row)  # again: an earlier row of this batch may now be kept
            except Reject as e:
                rejected = e
        prov = {"attempt": a, "seed": seed.provenance(), "teacher": settings["teacher"],
                "template_sha256": settings["template_sha256"],
                "sampling_seed": opts.seed + batch[0]}  # the seed the teacher got for this attempt's batch
        if a in scores:
            prov["judge_score"] = scores[a]
        if rejected is None:
            checks.add(row, f"attempt {a}")
            yield {**row, "metadata": {"synth": prov}}, True
        else:
            yield {**prov, "reason": rejected.reason, "message": str(rejected), "reply": reply.text,
                   **({"row": row} if row else {})}, False


def _filter_reasons(f: RowFilter, rows: list[dict]) -> list[str | None]:
    reasons = list(f.reasons(rows))
    if len(reasons) != len(rows):
        raise ConfigError(f"filter {f.name} returned {len(reasons)} verdicts for {len(rows)} rows")
    return reasons


def _settings(opts: SynthOptions, teacher, template: Template, filters, judge) -> dict:
    """What makes two runs the same generation (a rerun continues only with equal settings)."""
    return {"teacher": teacher.name, "mode": opts.mode, "template": template.where,
            "template_sha256": template.sha256, "seeds": str(opts.seeds),
            "seeds_sha256": hashlib.sha256(Path(opts.seeds).read_bytes()).hexdigest(),
            "system": opts.system, "against": [str(p) for p in opts.against], "sampling": asdict(opts.sampling),
            "seed": opts.seed, "filters": [f.name for f in filters], "judge": judge.settings() if judge else None}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _manifest(opts, settings, n_seeds, checks, kept, reasons, attempts, limit, started) -> dict:
    return {
        "version": 1,
        "settings": settings,
        "files": {"rows": ROWS, "rejects": REJECTS},
        "seeds": n_seeds,
        "against_rows": checks.against_rows,
        "requested": opts.n,
        "kept": kept,
        "rejected": sum(reasons.values()),
        "rejected_by_reason": dict(reasons.most_common()),
        "attempts": attempts,
        "max_attempts": limit,
        "complete": kept >= opts.n,
        "started": started,
        "updated": _now(),
    }


# ---------------------------------------------------------------- the command


def run_synth(opts: SynthOptions, teacher_spec: str, teacher_model: str | None = None, filter_specs=(),
              judge_spec: str | None = None, judge_model: str | None = None, judge_threshold: float = 7.0,
              judge_template: str | None = None, recipe: str | None = None, log=print) -> SynthResult:
    """`mlxft synth`: resolve the recipe's system prompt and eval data, open teacher, filters and judge, run."""

    if recipe:
        opts = _with_recipe(opts, recipe)
    filters = [SuiteFilter(spec) for spec in filter_specs]
    for f in filters:
        if f.data and f.data not in opts.against:  # the suite's own eval rows must never become training rows
            opts.against = (*opts.against, f.data)
    judge_template_obj = load_template(judge_template, JUDGE_TEMPLATE) if judge_spec else None
    read_seeds(opts.seeds)  # a bad seeds file fails before a model is loaded
    load_template(opts.template, TEMPLATES.get(opts.mode, TEMPLATES["generate"]))
    teacher = open_teacher(teacher_spec, teacher_model)
    judge = None
    if judge_spec:
        same = judge_spec == teacher_spec and judge_model == teacher_model
        judge = Judge(teacher if same else open_teacher(judge_spec, judge_model), judge_threshold, judge_template_obj)
    return synthesize(opts, teacher, filters, judge, log=log)


def _with_recipe(opts: SynthOptions, name: str) -> SynthOptions:
    """The recipe's system prompt (train/inference parity) and its valid/test splits as leakage targets."""

    r = load_recipe(name)
    data = resolve_data_dir(r.data.path)
    extra = tuple(p for p in (data / "valid.jsonl", data / "test.jsonl") if p.is_file() and p not in opts.against)
    opts.system = opts.system if opts.system is not None else r.data.system_prompt
    opts.against = (*opts.against, *extra)
    return opts
