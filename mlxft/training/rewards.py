"""GRPO's reward functions: the eval scorers themselves, your own Python, length limits, a judge.

What GRPO optimises and what `mlxft eval` measures are one definition: a reward named after a
scorer of `grpo.reward_suite` is that suite's scorer, with the suite's parameters (a JSON Schema,
a regex, label lists). Each reward gives one number per completion; a completion's reward is the
weighted sum. A user function (`--reward file.py:fn`) that raises or returns something that is not
a finite number scores that completion 0 and is counted (`reward_errors`), never ends the run.

    grpo:
      reward_suite: structured-output
      rewards: ["schema_valid:1.0", "only_json:0.5", "fields_correct:1.0", "max_words=60:0.2"]
      reward_functions: ["rewards/mine.py:score:1.0"]
      row_rewards: ["refusal:1.0"]   # only for rows that name it: {"messages": [...], "rewards": ["refusal"]}

A row's `rewards` field (a list of names) says which rewards score it, instead of the default
(`rewards` + `reward_functions`): e.g. harmful requests mixed into the prompts, scored on refusing.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlxft.config import GrpoConfig
from mlxft.errors import ConfigError, DataError
from mlxft.evaluation.judge import judge_pairs, mlx_judge
from mlxft.evaluation.scorers import Example, ScorerParamError, make_scorer
from mlxft.evaluation.suites import EVALS_DIR, load_suite
from mlxft.models.load import load_base

SPEC = re.compile(r"^(?P<name>[A-Za-z_][\w-]*)(=(?P<value>[^:]+))?(:(?P<weight>[-+]?[\d.eE+-]+))?$")
LENGTH_REWARDS = ("max_words", "max_chars")
JUDGE_TEMPLATE = "templates/pairwise.j2"  # evals/templates/: the rubric `mlxft eval`'s judge suites use


@dataclass
class Reward:
    name: str
    weight: float
    score: Callable[[list[str], list[Example]], list[float]]  # completions, their examples -> one value each
    errors: list[int] = field(default_factory=lambda: [0])  # completions whose reward function failed


@dataclass
class Rewards:
    rewards: list[Reward]
    default: list[str]  # the names that score a row with no `rewards` field (grpo.rewards + reward_functions)

    def __call__(self, completions: list[str], examples: list[Example]) -> tuple[list[float], dict[str, list[float]]]:
        """(weighted total per completion, each reward's values over the completions it scored).

        A row's `rewards` field names the rewards that score it; other rows get `default`."""
        names = [self.names_for(e) for e in examples]
        totals, values = [0.0] * len(completions), {}
        for r in self.rewards:
            rows = [i for i, n in enumerate(names) if r.name in n]
            if not rows:
                continue
            values[r.name] = r.score([completions[i] for i in rows], [examples[i] for i in rows])
            for i, v in zip(rows, values[r.name]):
                totals[i] += r.weight * v
        return totals, values

    def names_for(self, example: Example) -> list[str]:
        return example.row.get("rewards") or self.default

    def check_rows(self, examples: list[tuple[str, Example]]) -> None:
        """One DataError for the first row naming a reward the recipe does not define (file:line)."""
        known = {r.name for r in self.rewards}
        for where, example in examples:
            unknown = [n for n in example.row.get("rewards") or [] if n not in known]
            if unknown:
                raise DataError(f"{where}: rewards names {unknown[0]!r}, which the recipe does not define "
                                f"(grpo.rewards / grpo.row_rewards give: {', '.join(sorted(known))})")

    def errors(self) -> int:
        return sum(r.errors[0] for r in self.rewards)

    def needs_reference(self, example: Example) -> bool:
        """Whether a reward that scores this row compares with a reference."""
        names = self.names_for(example)
        return any(getattr(r.score, "needs_reference", False) for r in self.rewards if r.name in names)


def build_rewards(cfg: GrpoConfig, base_dir: Path | None = None) -> Rewards:
    """The rewards a recipe's `grpo:` section names, or one ConfigError listing every bad one."""
    problems: list[str] = []
    suite, base = None, base_dir or Path.cwd()
    if cfg.reward_suite:
        try:
            suite = load_suite(cfg.reward_suite)
        except Exception as e:  # the suite loader's own ConfigError/DataError, with file and key
            problems.append(f"grpo.reward_suite: {e}")
    out = []
    for i, spec in enumerate(cfg.rewards):
        try:
            out.append(_scorer_reward(spec, suite, base))
        except (ConfigError, ScorerParamError, ValueError) as e:
            problems.append(f"grpo.rewards[{i}] {spec!r}: {e}")
    for i, spec in enumerate(cfg.reward_functions):
        try:
            out.append(function_reward(spec))
        except ConfigError as e:
            problems.append(f"grpo.reward_functions[{i}] {spec!r}: {e}")
    default = [r.name for r in out]
    for i, spec in enumerate(cfg.row_rewards):
        try:
            out.append(_scorer_reward(spec, suite, base))
        except (ConfigError, ScorerParamError, ValueError) as e:
            problems.append(f"grpo.row_rewards[{i}] {spec!r}: {e}")
    names = [r.name for r in out]
    problems += [f"grpo: reward {n!r} is named twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if not default and not problems:
        problems.append("grpo.rewards: GRPO needs at least one reward (a scorer name, max_words=N, or --reward file.py:fn)")
    if problems:
        raise ConfigError("; ".join(problems))
    return Rewards(out, default)


def _parse(spec: str) -> tuple[str, str | None, float]:
    m = SPEC.match(spec.strip())
    if not m:
        raise ValueError("expected NAME[=VALUE][:WEIGHT], e.g. schema_valid:1.0 or max_words=20:0.5")
    weight = float(m.group("weight")) if m.group("weight") is not None else 1.0
    if not math.isfinite(weight):
        raise ValueError(f"weight {weight} is not a finite number")
    return m.group("name"), m.group("value"), weight


def _scorer_reward(spec: str, suite, base_dir: Path) -> Reward:
    name, value, weight = _parse(spec)
    if name in LENGTH_REWARDS:
        return Reward(f"{name}={value}", weight, length_reward(name, _positive_int(value, name)))
    if name == "judge":
        return Reward("judge", weight, judge_reward(value, suite))
    named = {s.name: s.scorer for s in suite.scorers} if suite is not None else {}
    scorer = named.get(name)
    if scorer is None:
        if value is not None:
            raise ValueError(f"'{name}' takes no value")
        scorer = make_scorer(name, {}, base_dir)  # a scorer type that needs no parameters
    if scorer.kind != "text":
        raise ValueError(f"'{name}' is a {scorer.kind} scorer; rewards score text (one value per reply)")

    def score(completions, examples):
        return [float(v) for v in scorer.score(completions, examples).per_example]

    score.needs_reference = scorer.needs_reference()
    return Reward(name, weight, score)


def _positive_int(value: str | None, name: str) -> int:
    try:
        n = int(value or "")
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{name}=N needs a positive whole number, e.g. {name}=20")
    return n


def length_reward(kind: str, limit: int) -> Callable:
    """1 within `limit` words (or characters), falling linearly to 0 at twice the limit."""

    def score(completions, examples):
        sizes = [len(c.split()) if kind == "max_words" else len(c) for c in completions]
        return [1.0 if n <= limit else max(0.0, 2.0 - n / limit) for n in sizes]

    return score


def judge_reward(source: str | None, suite) -> Callable:
    """A local LLM judge (optional, slow: a forward pass per completion and order): each completion
    against the prompt's reference, judged pairwise in both orders as `mlxft eval`'s judge suites do;
    the reward is the completion's points (1 better, 0.5 tie or split, 0 worse). `source`: the judge
    model (builtin:, a folder, .gguf, hub id); the rubric is the suite's judge scorer's, else
    evals/templates/pairwise.j2."""
    if not source:
        raise ValueError("judge=MODEL names the judge model, e.g. judge=builtin:smollm2-135m-instruct")
    scorers = [s.scorer for s in suite.scorers if s.scorer.type == "judge"] if suite is not None else []
    rubric = scorers[0] if scorers else make_scorer("judge", {"model": source, "template": JUDGE_TEMPLATE}, EVALS_DIR)
    judge = {}

    def score(completions, examples):
        if not judge:  # loaded on first use: a run whose rewards never reach it pays nothing
            base = load_base(source, None, training=False)
            judge["fn"] = mlx_judge(base.model, base.tokenizer)
        references = [e.reference or "" for e in examples]
        # judge_pairs scores its second list against its first: completions against the references.
        return [float(v) for v in judge_pairs(rubric, judge["fn"], examples, references, completions).per_example]

    score.needs_reference = True
    return score


def function_reward(spec: str) -> Reward:
    """`path/to/file.py:fn[:WEIGHT]`: fn(completion: str, example) -> float, called per completion."""
    parts = spec.rsplit(":", 2)
    weight = 1.0
    if len(parts) == 3:
        try:
            weight = float(parts[2])
        except ValueError:
            parts = spec.rsplit(":", 1)
        else:
            parts = parts[:2]
    if len(parts) != 2 or not parts[0].endswith(".py") or not parts[1].isidentifier():
        raise ConfigError("expected path/to/file.py:function[:weight]")
    path, name = Path(parts[0]).expanduser(), parts[1]
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    module_spec = importlib.util.spec_from_file_location(f"mlxft_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error in it is theirs to see, in one line
        raise ConfigError(f"{path} failed to import: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{path} has no function {name}()")
    reward = Reward(f"{path.stem}.{name}", weight, None)

    def score(completions, examples):
        out = []
        for completion, example in zip(completions, examples):
            try:
                value = float(fn(completion, example))
                if not math.isfinite(value):
                    raise ValueError(f"returned {value}")
            except Exception:  # contained: the completion scores 0 and the failure is counted
                reward.errors[0] += 1
                value = 0.0
            out.append(value)
        return out

    reward.score = score
    return reward
