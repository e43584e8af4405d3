"""The checks a synthesized row passes before `mlxft synth` keeps it.

`RowChecks` applies the rules of `mlxft data check` row by row: duplicates and near
duplicates of kept rows, and leakage into eval/test rows (also by prompt alone, since a
training row that asks a test question leaks it whatever its answer). `SuiteFilter`
turns a scorer of an eval suite (`--filter SUITE:SCORER`) into a filter on the row's answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mlxft.data.check import exact_key, near_key
from mlxft.data.formats import load_dataset
from mlxft.errors import ConfigError
from mlxft.evaluation.scorers import Example, normalize_text
from mlxft.evaluation.suites import load_suite


class Reject(Exception):
    """A candidate row is not kept; `reason` is the short kind counted in the manifest."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class RowFilter(Protocol):
    """An extra check on candidate rows: for each, None (keep) or why it fails."""

    name: str

    def reasons(self, rows: list[dict]) -> list[str | None]: ...


# ---------------------------------------------------------------- data checks


def prompt_key(row: dict) -> str:
    """What the student is asked (every turn before the last answer, no system): a row that asks a
    test question leaks it even with a different answer."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return near_key({"messages": [m for m in msgs[:last] if m["role"] != "system"]})


class RowChecks:
    """Duplicates against the kept rows, leakage against eval/test rows (the rules of `mlxft data check`)."""

    def __init__(self, against: tuple[Path, ...] = ()):
        self.kept: dict[str, dict[str, str]] = {"exact": {}, "near": {}, "prompt": {}}
        self.leak: dict[str, dict[str, str]] = {"near": {}, "prompt": {}}
        self.against_rows = 0
        for path in against:
            ds = load_dataset(Path(path))
            for split, rows in ds.splits.items():
                if split == "train" and Path(path).is_dir():
                    continue  # a folder's train split is what the rows join, not what they must not leak into
                for ex in rows:
                    if "messages" not in ex.row or not any(m["role"] == "assistant" for m in ex.row["messages"]):
                        continue
                    self.leak["near"].setdefault(near_key(ex.row), f"{ex.where} ({split})")
                    self.leak["prompt"].setdefault(prompt_key(ex.row), f"{ex.where} ({split})")
                    self.against_rows += 1

    @staticmethod
    def _keys(row: dict) -> dict[str, str]:
        return {"exact": exact_key(row), "near": near_key(row), "prompt": prompt_key(row)}

    def check(self, row: dict) -> None:
        keys = self._keys(row)
        for kind, what in (("near", "the same conversation"), ("prompt", "the same prompt")):
            if keys[kind] in self.leak[kind]:
                raise Reject("leakage", f"{what} as eval/test row {self.leak[kind][keys[kind]]}")
        for kind, what in (("exact", "exact duplicate"), ("near", "near duplicate (case, punctuation, spacing)"),
                           ("prompt", "same prompt")):
            if keys[kind] in self.kept[kind]:
                raise Reject("duplicate", f"{what} of kept row {self.kept[kind][keys[kind]]}")

    def add(self, row: dict, where: str) -> None:
        for kind, key in self._keys(row).items():
            self.kept[kind].setdefault(key, where)


# ---------------------------------------------------------------- eval-suite scorers as filters


class SuiteFilter:
    """`SUITE:SCORER`: keep a row when that scorer of the eval suite passes on the row's answer alone.

    A generated row has no reference answer, so scorers that compare with one are refused,
    except label accuracy, which becomes "the answer is one of the labels" (the whole
    normalised answer: a training row teaches the exact form). The suite's own data is
    what the rows must not leak into.
    """

    def __init__(self, spec: str):
        suite_name, sep, scorer_name = spec.rpartition(":")
        if not sep or not suite_name or not scorer_name:
            raise ConfigError(f"--filter takes SUITE:SCORER (e.g. commit-type:accuracy), got {spec!r}")
        suite = load_suite(suite_name)
        found = next((s for s in suite.scorers if s.name == scorer_name), None)
        if found is None:
            raise ConfigError(f"suite {suite.name} has no scorer {scorer_name!r}; its scorers: "
                              f"{', '.join(s.name for s in suite.scorers)}")
        self.scorer, self.name, self.data = found.scorer, f"{suite.name}:{scorer_name}", suite.data
        self.labels = getattr(self.scorer, "labels", None) if self.scorer.type == "label_accuracy" else None
        if getattr(self.scorer, "field", None):  # contains_*: phrases read from each eval row's own key
            raise ConfigError(f"{self.name} ({self.scorer.type}) takes its phrases from each eval row's "
                              f"'{self.scorer.field}', which a generated row does not have; use a scorer with fixed "
                              "phrases, a label set, a regex or a JSON Schema")
        if self.scorer.kind != "text" or (self.scorer.needs_reference() and self.labels is None):
            raise ConfigError(f"{self.name} ({self.scorer.type}) needs a reference answer or a model, which a "
                              "generated row does not have; filter with a scorer that checks the answer alone "
                              "(label_accuracy, regex, json_valid, json_schema, contains_all/any, refusal)")

    def reasons(self, rows: list[dict]) -> list[str | None]:
        answers = [r["messages"][-1]["content"] for r in rows]
        if self.labels is not None:
            allowed = {normalize_text(label) for label in self.labels}
            return [None if normalize_text(a) in allowed else
                    f"answer {a[:60]!r} is not one of the labels ({', '.join(self.labels)})" for a in answers]
        examples = [Example(r["messages"][:-1], None, r) for r in rows]
        scores = self.scorer.score(answers, examples).per_example or []
        out = []
        for answer, score in zip(answers, scores):
            ok = score >= 1 if self.scorer.higher_is_better else score <= 0
            detail = self.scorer.first_error(answer) if hasattr(self.scorer, "first_error") else None
            out.append(None if ok else f"fails {self.name} ({self.scorer.type}" + (f": {detail})" if detail else ")"))
        return out
