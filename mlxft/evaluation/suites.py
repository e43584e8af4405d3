"""Eval suites: `evals/<name>.yaml` -> a checked `Suite` (data, prompt, generation, scorers, gates).

    name: commit-type                      # optional; the file name otherwise
    description: Classify commit messages
    data: ../datasets/commit-type/test.jsonl   # relative to this file
    limit: null                            # score only the first N rows
    prompt:
      system: default    # default: the row's own system turn, else the run's training prompt
                         # none: no system turn; any other text replaces the rows' system turn
      few_shot: {data: ../datasets/commit-type/train.jsonl, shots: 3}   # optional
    generation: {max_tokens: 8, batch_size: 32}
    scorers:
      - name: accuracy
        type: label_accuracy
        labels: [feat, fix]
        gate: {min: 0.6}                   # or min_delta, max, max_drop_points, max_rise_pct

Data rows are chat JSONL: the last assistant turn is the reference, the turns before
it the prompt (a row may end with a user turn when no reference is needed). A
perplexity scorer may name its own `data` (chat rows or {"text": ...} rows).
Every problem is reported at once, each with the file and the key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlxft.config import EvalConfig
from mlxft.data.encode import read_chat_jsonl
from mlxft.errors import ConfigError, DataError
from mlxft.evaluation.scorers import Example, Scorer, ScorerParamError, make_scorer
from mlxft.recipes import named_yaml

EVALS_DIR = Path(__file__).resolve().parents[2] / "evals"

# Gate kind -> (how the rule reads, test(base, adapter, threshold)).
GATES = {
    "min": "adapter >= {t}",
    "max": "adapter <= {t}",
    "min_delta": "adapter - base >= {t}",
    "max_drop_points": "adapter >= base - {t} points",
    "max_rise_pct": "adapter <= base + {t}%",
}
RELATIVE_GATES = ("min_delta", "max_drop_points", "max_rise_pct")


@dataclass
class Gate:
    kind: str
    threshold: float | str  # a number, or "eval.<key>": the recipe's EvalConfig value

    def resolve(self, eval_config: EvalConfig | None) -> float:
        if isinstance(self.threshold, str):
            return float(getattr(eval_config or EvalConfig(), self.threshold.removeprefix("eval.")))
        return float(self.threshold)

    def check(self, base: float | None, adapter: float, unit: str, eval_config: EvalConfig | None = None) -> dict:
        """{"rule": "adapter >= 70%", "passed": bool or None (relative gate with no base)}."""
        t = self.resolve(eval_config)
        shown = f"{100 * t:g}%" if unit == "fraction" and self.kind in ("min", "max", "min_delta") else f"{t:g}"
        if self.kind == "min_delta" and unit == "fraction":
            shown = f"{100 * t:g} points"
        rule = GATES[self.kind].format(t=shown)
        if isinstance(self.threshold, str):
            rule += f" ({self.threshold})"
        if self.kind in RELATIVE_GATES and base is None:
            return {"rule": rule, "passed": None, "note": "no base to compare with"}
        scale = 100.0 if unit == "fraction" else 1.0
        passed = {
            "min": lambda: adapter >= t,
            "max": lambda: adapter <= t,
            "min_delta": lambda: adapter - base >= t - 1e-12,
            "max_drop_points": lambda: adapter * scale >= base * scale - t - 1e-9,
            "max_rise_pct": lambda: adapter <= base * (1 + t / 100) + 1e-12,
        }[self.kind]()
        return {"rule": rule, "passed": bool(passed)}


@dataclass
class ScorerSpec:
    name: str
    scorer: Scorer
    gate: Gate | None = None
    data: Path | None = None  # perplexity only: its own rows


@dataclass
class FewShot:
    data: Path
    shots: int
    seed: int = 0


@dataclass
class Suite:
    name: str
    path: Path
    description: str = ""
    data: Path | None = None
    limit: int | None = None
    system: str = "default"  # default | none | literal text
    few_shot: FewShot | None = None
    max_tokens: int = 64
    batch_size: int = 32
    scorers: list[ScorerSpec] = field(default_factory=list)

    @property
    def generates(self) -> bool:
        return any(s.scorer.kind in ("text", "judge") for s in self.scorers)


_SUITE_KEYS = ("name", "description", "data", "limit", "prompt", "generation", "scorers")
_PROMPT_KEYS = ("system", "few_shot")
_FEW_SHOT_KEYS = ("data", "shots", "seed")
_GENERATION_KEYS = ("max_tokens", "batch_size")
_SPEC_KEYS = ("name", "type", "gate", "data")


def list_suites(evals_dir: Path = EVALS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(evals_dir).glob("*.yaml"))


def suite_path(name_or_path: str) -> Path:
    """evals/<name>.yaml for a name, or the given .yaml path."""

    return named_yaml(name_or_path, EVALS_DIR, list_suites, "suite file not found", "unknown eval suite")


def load_suite(name_or_path: str, data_override: str | Path | None = None) -> Suite:
    """Read and check a suite; one ConfigError lists every problem with file and key."""
    path = suite_path(name_or_path)
    problems: list[str] = []
    where = str(path)

    def bad(key: str, message: str):
        problems.append(f"{where}: {key}: {message}")

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{where}: {line}invalid YAML: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML: nested too deeply to be an eval suite") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with data, prompt, generation and scorers")
    for key in raw:
        if key not in _SUITE_KEYS:
            bad(str(key), f"unknown key; valid keys: {', '.join(_SUITE_KEYS)}")
    suite = Suite(name=str(raw.get("name") or path.stem), path=path, description=str(raw.get("description") or ""))
    base_dir = path.parent

    data = data_override if data_override is not None else raw.get("data")
    if data is not None:
        suite.data = _existing_file(Path(data) if data_override is not None else base_dir / str(data),
                                    "--data" if data_override is not None else "data", bad)
    suite.limit = _positive_int(raw.get("limit"), "limit", bad, allow_none=True)
    _read_prompt(raw.get("prompt"), suite, base_dir, bad)
    generation = _mapping(raw.get("generation"), "generation", _GENERATION_KEYS, bad)
    suite.max_tokens = _positive_int(generation.get("max_tokens", suite.max_tokens), "generation.max_tokens", bad)
    suite.batch_size = _positive_int(generation.get("batch_size", suite.batch_size), "generation.batch_size", bad)

    specs = raw.get("scorers")
    if not isinstance(specs, list) or not specs:
        bad("scorers", "expected a non-empty list of scorers ({name: ..., type: ...})")
        specs = []
    names: set[str] = set()
    for i, spec in enumerate(specs):
        scorer = _read_scorer(spec, f"scorers[{i}]", base_dir, bad)
        if scorer is None:
            continue
        if scorer.name in names:
            bad(f"scorers[{i}].name", f"duplicate scorer name {scorer.name!r}")
        names.add(scorer.name)
        if scorer.scorer.kind != "perplexity" and suite.data is None:
            bad(f"scorers[{i}]", f"a {scorer.scorer.type} scorer needs the suite's data")
        if scorer.scorer.kind == "perplexity" and scorer.data is None and suite.data is None:
            bad(f"scorers[{i}].data", "a perplexity scorer needs data (its own or the suite's)")
        suite.scorers.append(scorer)
    if problems:
        listing = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        raise ConfigError(f"eval suite {where} has {len(set(problems))} problem(s):\n{listing}")
    return suite


def _mapping(value, key, allowed, bad) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        bad(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {}
    for k in value:
        if k not in allowed:
            bad(f"{key}.{k}", f"unknown key; valid keys: {', '.join(f'{key}.{a}' for a in allowed)}")
    return value


def _positive_int(value, key, bad, allow_none=False):
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        bad(key, f"expected a positive int, got {value!r}")
        return 1
    return value


def _existing_file(path: Path, key, bad) -> Path | None:
    path = path.expanduser().resolve()
    if not path.is_file():
        bad(key, f"data file not found: {path}")
        return None
    return path


def _read_prompt(value, suite: Suite, base_dir: Path, bad) -> None:
    prompt = _mapping(value, "prompt", _PROMPT_KEYS, bad)
    system = prompt.get("system", "default")
    if system is None:
        system = "none"
    if not isinstance(system, str):
        bad("prompt.system", f"expected default, none or a system prompt text, got {system!r}")
    else:
        suite.system = system
    few = prompt.get("few_shot")
    if few is not None:
        few = _mapping(few, "prompt.few_shot", _FEW_SHOT_KEYS, bad)
        if "data" not in few:
            bad("prompt.few_shot.data", "missing; expected the chat JSONL the examples come from")
            return
        data = _existing_file(base_dir / str(few["data"]), "prompt.few_shot.data", bad)
        shots = _positive_int(few.get("shots", 3), "prompt.few_shot.shots", bad)
        seed = few.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            bad("prompt.few_shot.seed", f"expected an int, got {seed!r}")
            seed = 0
        if data is not None:
            suite.few_shot = FewShot(data, shots, seed)


def _read_scorer(spec, key, base_dir: Path, bad) -> ScorerSpec | None:
    if not isinstance(spec, dict):
        bad(key, f"expected a mapping with name and type, got {spec!r}")
        return None
    type_name = spec.get("type")
    name = spec.get("name", type_name)
    if not isinstance(type_name, str):
        bad(f"{key}.type", "missing; expected a scorer type such as exact_match or label_accuracy")
        return None
    if not isinstance(name, str) or not name:
        bad(f"{key}.name", f"expected a non-empty string, got {name!r}")
        return None
    params = {k: v for k, v in spec.items() if k not in _SPEC_KEYS}
    try:
        scorer = make_scorer(type_name, params, base_dir)
    except ScorerParamError as e:
        bad(f"{key}.{e.key}", str(e))
        return None
    data = None
    if spec.get("data") is not None:
        if scorer.kind != "perplexity":
            bad(f"{key}.data", "only a perplexity scorer takes its own data")
        else:
            data = _existing_file(base_dir / str(spec["data"]), f"{key}.data", bad)
    return ScorerSpec(name, scorer, _read_gate(spec.get("gate"), f"{key}.gate", bad), data)


def _read_gate(value, key, bad) -> Gate | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) != 1:
        bad(key, f"expected one rule, e.g. {{min: 0.7}}; rules: {', '.join(GATES)}")
        return None
    ((kind, threshold),) = value.items()
    if kind not in GATES:
        bad(f"{key}.{kind}", f"unknown gate rule; rules: {', '.join(GATES)}")
        return None
    if isinstance(threshold, str):
        fields = EvalConfig.__dataclass_fields__
        name = threshold.removeprefix("eval.")
        if not threshold.startswith("eval.") or name not in fields or not isinstance(getattr(EvalConfig(), name), float):
            numeric = [f"eval.{f}" for f in fields if isinstance(getattr(EvalConfig(), f), float)]
            bad(f"{key}.{kind}", f"expected a number or a recipe setting ({', '.join(numeric)}), got {threshold!r}")
            return None
    elif not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
        bad(f"{key}.{kind}", f"expected a number, got {threshold!r}")
        return None
    return Gate(kind, threshold)


# ---------------------------------------------------------------- rows and prompts


def split_reference(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(prompt messages, reference): the reference is a final assistant turn, if any."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def build_messages(prompt: list[dict], system: str, run_system: str | None, shots: list[dict]) -> list[dict]:
    """The messages sent to the model: system turn per `system`, few-shot turns, then the prompt."""
    own = [m for m in prompt if m["role"] == "system"]
    rest = [m for m in prompt if m["role"] != "system"]
    if system == "default":
        head = own[:1] or ([{"role": "system", "content": run_system}] if run_system else [])
    elif system == "none":
        head = []
    else:
        head = [{"role": "system", "content": system}]
    return [*head, *shots, *rest]


def few_shot_turns(few: FewShot | None, exclude: set[str]) -> list[dict]:
    """user/assistant pairs drawn (seeded) from `few.data`, skipping any whose user text is in `exclude`.

    Only rows under the file's most common system prompt are drawn: a training split that mixes
    in replay rows (general questions, refusals under another prompt) gives shots of the task."""
    if few is None:
        return []
    groups: dict[str | None, list] = {}
    for row in read_chat_jsonl(few.data, need_role="user"):
        prompt, ref = split_reference(row["messages"])
        users = [m for m in prompt if m["role"] == "user"]
        system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
        if ref is not None and users and users[-1]["content"] not in exclude:
            groups.setdefault(system, []).append((users[-1]["content"], ref))
    pool = max(groups.values(), key=len, default=[])
    if len(pool) < few.shots:
        raise DataError(f"{few.data}: {len(pool)} usable rows for {few.shots} few-shot examples")
    picked = random.Random(few.seed).sample(pool, few.shots)
    return [t for user, ref in picked for t in ({"role": "user", "content": user}, {"role": "assistant", "content": ref})]


def suite_examples(suite: Suite, run_system: str | None) -> list[Example]:
    """The suite's rows as Examples with the prompt built as the suite says."""
    if suite.data is None:  # a suite of perplexity scorers with their own data
        return []
    rows = read_chat_jsonl(suite.data, need_role="user")
    if suite.limit:
        rows = rows[: suite.limit]
    users = {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    shots = few_shot_turns(suite.few_shot, users)
    out = []
    for row in rows:
        prompt, ref = split_reference(row["messages"])
        out.append(Example(build_messages(prompt, suite.system, run_system, shots), ref, row))
    needs = [s.name for s in suite.scorers if s.scorer.needs_reference() or (s.scorer.kind == "perplexity" and s.data is None)]
    missing = sum(e.reference is None for e in out)
    if needs and missing:
        raise DataError(f"{suite.data}: {missing} rows have no reference answer (a final assistant turn), "
                        f"which scorer(s) {', '.join(needs)} need")
    return out
