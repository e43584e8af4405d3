"""Checks on the bundled demo dataset datasets/commit-type (fast; no model needed)."""

from __future__ import annotations

import collections
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "datasets" / "commit-type"
SPLITS = ("train", "valid", "test")
MINIMUM = {"train": 800, "valid": 100, "test": 150}
SYSTEM = (
    "Classify the git commit message. Reply with exactly one label: "
    "feat, fix, docs, refactor, test, perf, build, ci, chore or style."
)
LABELS = {"feat", "fix", "docs", "refactor", "test", "perf", "build", "ci", "chore", "style"}
# "feat:", "fix(parser):", "refactor!:", "Docs:" ... and any other "word:" / "word(scope):" start.
PREFIX = re.compile(r"^\s*[A-Za-z][\w-]*(\([^)]*\))?!?:")


def _load_generator():
    spec = importlib.util.spec_from_file_location("commit_type_generate", DATA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(split: str) -> list[dict]:
    lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{split}.jsonl must end with a newline"
    return [json.loads(line) for line in lines[:-1]]


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


@pytest.fixture(scope="module")
def rows() -> dict[str, list[dict]]:
    return {split: _read(split) for split in SPLITS}


def _user(row: dict) -> str:
    return row["messages"][1]["content"]


def _label(row: dict) -> str:
    return row["messages"][2]["content"]


def test_generator_constants():
    gen = _load_generator()
    assert gen.SYSTEM_PROMPT == SYSTEM
    assert set(gen.LABELS) == LABELS and len(gen.LABELS) == 10


@pytest.mark.parametrize("split", SPLITS)
def test_counts(rows, split):
    assert len(rows[split]) >= MINIMUM[split]


@pytest.mark.parametrize("split", SPLITS)
def test_row_shape(rows, split):
    for row in rows[split]:
        assert list(row) == ["messages"]
        msgs = row["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert all(set(m) == {"role", "content"} for m in msgs)
        assert msgs[0]["content"] == SYSTEM
        assert msgs[2]["content"] in LABELS
        user = msgs[1]["content"]
        assert user.strip() and user == user.strip()
        assert not PREFIX.match(user), f"conventional prefix left in: {user!r}"
        assert len(user.split()) <= 40, f"too long: {user!r}"


@pytest.mark.parametrize("split", SPLITS)
def test_every_label_present(rows, split):
    assert {_label(r) for r in rows[split]} == LABELS


def test_train_label_balance(rows):
    counts = collections.Counter(_label(r) for r in rows["train"])
    total = len(rows["train"])
    for label in LABELS:
        assert 0.05 <= counts[label] / total <= 0.15, (label, counts[label], total)


@pytest.mark.parametrize("split", SPLITS)
def test_shuffled(rows, split):
    labels = [_label(r) for r in rows[split]]
    changes = sum(a != b for a, b in zip(labels, labels[1:]))
    assert changes > 0.6 * len(labels)  # sorted by label would give 9 changes


def test_no_duplicates_within_or_across_splits(rows):
    seen: dict[str, str] = {}
    for split in SPLITS:
        for row in rows[split]:
            key = _norm(_user(row))
            assert key not in seen, f"duplicate in {split} and {seen[key]}: {_user(row)!r}"
            seen[key] = split


def test_heldout_vocabulary_only_in_test(rows):
    terms = [t.lower() for t in _load_generator().HELDOUT_TERMS]
    assert terms
    for split in ("train", "valid"):
        for row in rows[split]:
            text = _user(row).lower()
            assert not [t for t in terms if t in text], (split, _user(row))
    with_heldout = [r for r in rows["test"] if any(t in _user(r).lower() for t in terms)]
    assert len(with_heldout) >= 0.25 * len(rows["test"])
    assert {_label(r) for r in with_heldout} == LABELS


def test_generator_reproduces_committed_files(tmp_path):
    script = DATA / "generate.py"
    subprocess.run(
        [sys.executable, str(script), "--seed", "0", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )
    for split in SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (DATA / f"{split}.jsonl").read_bytes(), split
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.jsonl" for s in SPLITS)


def test_generate_is_deterministic_and_seed_dependent():
    gen = _load_generator()
    a, b = gen.generate(0), gen.generate(0)
    assert a == b
    assert gen.generate(1)["train"] != a["train"]


def test_heldout_subsets_cover_test_split(rows):
    subsets = _load_generator().heldout_subsets(0)
    assert set(subsets) == {_user(r) for r in rows["test"]}
    counts = collections.Counter(subsets.values())
    assert set(counts) == {"main", "heldout_vocab", "heldout_wording"}
    assert counts["main"] >= 0.4 * len(rows["test"])
    assert counts["heldout_vocab"] + counts["heldout_wording"] >= 0.4 * len(rows["test"])
