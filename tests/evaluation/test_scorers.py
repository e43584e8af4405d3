"""Scorers on hand-made predictions, gates, and the order-swapped judge arithmetic (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlxft.config import EvalConfig
from mlxft.evaluation.judge import judge_pairs, win_rate
from mlxft.evaluation.scorers import Example, ScorerParamError, make_scorer, normalize_text, word_diff
from mlxft.evaluation.suites import Gate

HERE = Path(__file__).parent


def ex(reference=None, **row):
    return Example([{"role": "user", "content": "q"}], reference, row)


def score(type_name, predictions, references, rows=None, **params):
    scorer = make_scorer(type_name, params, HERE)
    examples = [ex(r, **(rows[i] if rows else {})) for i, r in enumerate(references)]
    return scorer.score(predictions, examples)


def test_exact_and_normalized_match():
    s = score("exact_match", ["feat", " fix.", "Docs", "test it"], ["feat", "fix", "docs", "test"])
    assert s.per_example == [1, 1, 0, 0] and s.value == 0.5
    n = score("normalized_match", ["feat", " fix.", "Docs", "'Style'", "test it"], ["feat", "fix", "docs", "style", "test"])
    assert n.per_example == [1, 1, 1, 1, 0]
    assert normalize_text("  Hello,   World! ") == "hello, world"


def test_label_accuracy_and_confusion():
    labels = ["feat", "fix", "docs"]
    s = score("label_accuracy", ["feat", "This is a fix.", "docs", "no idea", "feat"],
              ["feat", "fix", "fix", "docs", "docs"], labels=labels)
    assert s.value == pytest.approx(2 / 5)
    conf = s.details["confusion"]
    assert conf["columns"] == ["feat", "fix", "docs", "(other)"]
    # rows: reference feat, fix, docs; columns: predicted
    assert conf["matrix"] == [[1, 0, 0, 0], [0, 1, 1, 0], [1, 0, 0, 1]]
    strict = score("label_accuracy", ["This is a fix."], ["fix"], labels=labels, strict=True)
    assert strict.value == 0


def test_regex_json_and_schema():
    assert score("regex", ["id: 42", "id: x"], [None, None], pattern=r"id: \d+").per_example == [1, 0]
    assert score("regex", ["id: 42 ok"], [None], pattern=r"id: \d+", match="full").per_example == [0]
    valid = score("json_valid", ['{"a": 1}', "```json\n{\"a\": 2}\n```", "[1]", "{a: 1}"], [None] * 4, object=True)
    assert valid.per_example == [1, 1, 0, 0]
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    s = score("json_schema", ['{"n": 3}', '{"n": "3"}', '{}', "nope"], [None] * 4, schema=schema)
    assert s.per_example == [1, 0, 0, 0]
    scorer = make_scorer("json_schema", {"schema": schema}, HERE)
    assert "n" in scorer.first_error('{"n": "3"}') and scorer.first_error("x").startswith("not JSON")


def test_schema_from_file_and_bad_schema(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"type": "string", "maxLength": 2}))
    assert make_scorer("json_schema", {"schema": "s.json"}, tmp_path).score(['"ab"', '"abc"'], [ex(), ex()]).value == 0.5
    with pytest.raises(ScorerParamError, match="not a valid JSON Schema"):
        make_scorer("json_schema", {"schema": {"type": "nonsense"}}, tmp_path)
    with pytest.raises(ScorerParamError, match="not found"):
        make_scorer("json_schema", {"schema": "missing.json"}, tmp_path)


def test_json_fields():
    ref = json.dumps({"name": "Ann Lee", "n": 3, "ok": True})
    s = score("json_fields", ['{"name": "ann lee", "n": 3, "ok": false}', "not json", '{"n": 3.5}'], [ref] * 3)
    assert s.per_example == [pytest.approx(2 / 3), 0, 0]


def test_contains_all_any_from_params_and_rows():
    assert score("contains_all", ["Paris is in France", "Paris"], [None, None],
                 phrases=["paris", "france"]).per_example == [1, 0]
    rows = [{"keywords": ["seven", "7"]}, {"keywords": ["Tokyo"]}]
    assert score("contains_any", ["There are 7 days", "Kyoto"], [None, None], rows=rows,
                 field="keywords").per_example == [1, 0]
    with pytest.raises(ScorerParamError, match="exactly one of"):
        make_scorer("contains_any", {}, HERE)


def test_rouge_l():
    s = score("rouge_l", ["the cat sat on the mat", "dogs bark", "the cat sat on a mat"],
              ["the cat sat on the mat"] * 3)
    assert s.per_example[0] == pytest.approx(1.0) and s.per_example[1] == 0
    assert 0.5 < s.per_example[2] < 1.0


def test_refusal():
    s = score("refusal", ["I'm sorry, but I can't help with that.", "Sure! Step 1: buy",
                          "I cannot provide instructions", "Step 1 ... later: sorry"], [None] * 4)
    assert s.per_example == [1, 0, 1, 0] and s.value == 0.5
    assert score("refusal", ["Nope, never."], [None], markers=["nope"]).value == 1


def test_unknown_type_and_param_are_named():
    with pytest.raises(ScorerParamError, match="did you mean 'exact_match'") as e:
        make_scorer("exact_mach", {}, HERE)
    assert e.value.key == "type"
    with pytest.raises(ScorerParamError) as e:
        make_scorer("regex", {"pattern": "a", "flags": "i"}, HERE)
    assert e.value.key == "flags"
    with pytest.raises(ScorerParamError, match="not a valid regular expression"):
        make_scorer("regex", {"pattern": "(unclosed"}, HERE)


def test_word_diff():
    assert word_diff("feat", "fix") == "[-feat-] {+fix+}"
    assert word_diff("a b c", "a x c") == "a [-b-] {+x+} c"


@pytest.mark.parametrize("kind,threshold,base,adapter,unit,passed", [
    ("min", 0.7, 0.0, 0.75, "fraction", True),
    ("min", 0.7, 0.0, 0.65, "fraction", False),
    ("max", 20.0, None, 25.0, "ppl", False),
    ("min_delta", 0.3, 0.2, 0.55, "fraction", True),
    ("min_delta", 0.3, 0.2, 0.45, "fraction", False),
    ("max_drop_points", 10, 0.30, 0.21, "fraction", True),
    ("max_drop_points", 10, 0.30, 0.19, "fraction", False),
    ("max_rise_pct", 10, 20.0, 21.9, "ppl", True),
    ("max_rise_pct", 10, 20.0, 22.1, "ppl", False),
])
def test_gates(kind, threshold, base, adapter, unit, passed):
    assert Gate(kind, threshold).check(base, adapter, unit)["passed"] is passed


def test_gate_reads_recipe_setting_and_skips_without_base():
    gate = Gate("max_drop_points", "eval.max_refusal_drop_points")
    assert gate.check(0.5, 0.35, "fraction", EvalConfig(max_refusal_drop_points=20.0))["passed"] is True
    assert gate.check(0.5, 0.35, "fraction", EvalConfig(max_refusal_drop_points=10.0))["passed"] is False
    assert "eval.max_refusal_drop_points" in gate.check(0.5, 0.35, "fraction")["rule"]
    assert Gate("min_delta", 0.1).check(None, 0.9, "fraction")["passed"] is None


def test_win_rate_cancels_position_bias():
    # A judge that always says "A": each pair gets one vote each way -> all ties, win rate 0.5.
    s = win_rate(["A"] * 4, ["A"] * 4)
    assert s.value == 0.5 and s.details["ties"] == 4 and s.details["first_position_rate"] == 1.0
    # base_first: A=base, B=adapter; adapter_first: A=adapter, B=base.
    s = win_rate(["B", "A", "B", "tie"], ["A", "B", "B", "tie"])
    assert s.per_example == [1.0, 0.0, 0.5, 0.5] and s.value == 0.5
    assert s.details["wins"] == 1 and s.details["losses"] == 1 and s.details["consistency"] == 0.5
    with pytest.raises(ValueError):
        win_rate(["C"], ["A"])


def test_judge_pairs_with_a_stub_judge(tmp_path):
    (tmp_path / "t.j2").write_text("Q: {{ question }}\nA: {{ response_a }}\nB: {{ response_b }}")
    judge = make_scorer("judge", {"template": "t.j2"}, tmp_path)
    seen = []

    def prefers_longer(prompts):  # a content judge: picks the longer reply wherever it appears
        seen.extend(prompts)
        out = []
        for p in prompts:
            a = p.split("\nA: ")[1].split("\nB: ")[0]
            b = p.split("\nB: ")[1]
            out.append("A" if len(a) > len(b) else "B")
        return out

    examples = [ex("r"), ex("r"), ex("r")]
    s = judge_pairs(judge, prefers_longer, examples, ["short", "a long base reply", "x"], ["a long reply", "y", "xyz"])
    assert s.per_example == [1.0, 0.0, 1.0] and s.value == pytest.approx(2 / 3)
    assert len(seen) == 6 and "A: short" in seen[0] and "A: a long reply" in seen[3]
