"""`mlxft data check`: every problem with its location, errors first; and the bad-input corpus."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.data.check import check_path
from mlxft.recipes import load_recipe

BAD = Path(__file__).resolve().parents[1] / "fixtures" / "bad"
EXPECTED = json.loads((BAD / "expected.json").read_text())


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def rows(*conversations):
    return "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n"
                   for conv in conversations)


def test_corpus_is_big_enough():
    assert len(EXPECTED) >= 30
    assert all((BAD / name).exists() for name in EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_input_is_reported_and_nothing_is_written(name, tiny_model, tmp_path):
    src, before = BAD / name, tree_hash(BAD)
    check = run("data", "check", src, "--model", tiny_model)
    assert check.exit_code == 1, check.output
    assert "Traceback" not in check.output
    assert EXPECTED[name] in check.output
    located = [line for line in check.output.splitlines() if EXPECTED[name] in line]
    assert any(name in line for line in located), check.output  # the message names the file (and line)
    out = tmp_path / "out"
    prep = run("data", "prepare", src, out, "--model", tiny_model)
    assert prep.exit_code == 1 and "Traceback" not in prep.output
    assert name in prep.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert tree_hash(BAD) == before


@pytest.mark.parametrize("cmd", [("check", "deep_nesting.jsonl"), ("check", "latin1.jsonl"), ("prepare", "no_splits")])
def test_bad_input_from_a_real_process(cmd, tiny_model, tmp_path):
    verb, name = cmd
    args = [BAD / name] + ([tmp_path / "out"] if verb == "prepare" else [])
    p = subprocess.run([sys.executable, "-m", "mlxft.cli", "data", verb, *map(str, args), "--model", str(tiny_model)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout
    assert EXPECTED[name] in p.stdout + p.stderr
    assert not (tmp_path / "out").exists()


def test_fifty_megabyte_line(tiny_model, tmp_path):
    src = tmp_path / "huge.jsonl"
    row = {"messages": [{"role": "user", "content": "x" * (50 * 2**20)}, {"role": "assistant", "content": "y"}]}
    src.write_text(rows([("user", "q"), ("assistant", "a")]) + json.dumps(row) + "\n")
    r = run("data", "check", src, "--model", tiny_model)
    assert r.exit_code == 1 and "huge.jsonl:2" in r.output and "50 MiB" in r.output
    r = run("data", "prepare", src, tmp_path / "out", "--model", tiny_model)
    assert r.exit_code == 1 and not (tmp_path / "out").exists()


def test_errors_come_first_then_warnings_then_table(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        rows([("user", "a"), ("assistant", "b")], [("user", "a"), ("assistant", "b")], [("user", "q")]))
    report = check_path(tmp_path)
    text = report.format()
    assert text.index("error: conversation has no assistant turn") < text.index("warning: exact duplicate")
    assert text.index("warning: exact duplicate") < text.index("supervised")
    assert "train.jsonl:3" in text and "train.jsonl:2" in text and not report.ok


def test_duplicates_near_duplicates_and_leakage(tmp_path):
    (tmp_path / "train.jsonl").write_text(rows([("user", "Hello, World"), ("assistant", "b")],
                                               [("user", "hello world!"), ("assistant", "b")]))
    (tmp_path / "test.jsonl").write_text(rows([("user", "HELLO WORLD"), ("assistant", "B")],
                                              [("user", "other"), ("assistant", "c")]))
    report = check_path(tmp_path)
    by_code = {p.code: p for p in report.problems}
    assert by_code["near-duplicate"].where.endswith("train.jsonl:2")
    assert by_code["leakage"].severity == "error" and by_code["leakage"].where.endswith("test.jsonl:1")


def test_token_checks_against_the_recipe(tiny_model, tmp_path):
    from mlxft.data.encode import load_tokenizer

    recipe = load_recipe("smollm2-135m", overrides=["train.max_seq_length=100", "data.system_prompt=Be terse."])
    tokenizer, _ = load_tokenizer(str(tiny_model))
    (tmp_path / "train.jsonl").write_text(rows(
        [("system", "Be terse."), ("user", "q"), ("assistant", "short")],
        [("system", "Be chatty."), ("user", "q " * 200), ("assistant", "long answer")],
        [("user", "p"), ("assistant", "a1"), ("user", "q"), ("assistant", "a2")]))
    report = check_path(tmp_path, recipe, tokenizer)
    stats = report.stats["train"]
    assert stats["truncated"] == 1 and stats["supervised_lost"] > 0
    # supervised = each assistant content + its end-of-turn token, summed over every turn
    count = lambda s: len(tokenizer.encode(s, add_special_tokens=False)) + 1  # noqa: E731
    assert stats["supervised"] == count("short") + count("long answer") + count("a1") + count("a2")
    messages = [p.message for p in report.warnings]
    assert any("2 different system prompts" in m for m in messages)
    assert any("different from the recipe's data.system_prompt" in m for m in messages)
    assert any("leaves nothing to learn" in m for m in messages)
    assert report.ok


def test_template_without_tool_support_is_a_render_error(tiny_model, tmp_path):
    from mlxft.data.encode import load_tokenizer

    tokenizer, _ = load_tokenizer(str(tiny_model))  # plain ChatML: ignores tool_calls
    row = {"messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "12C"},
        {"role": "assistant", "content": "12C in Oslo."}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    report = check_path(tmp_path, None, tokenizer)
    assert not report.ok and "does not support tool calls" in report.errors[0].message


def test_fix_writes_a_clean_copy_and_never_touches_the_input(tiny_model, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text(rows([("user", "a"), ("assistant", "b")], [("user", "a"), ("assistant", "b")],
                                          [("user", "c"), ("assistant", "d")]) + "{broken\n")
    (src / "valid.jsonl").write_text(rows([("user", "C"), ("assistant", "d")], [("user", "e"), ("assistant", "f")]))
    before = tree_hash(src)
    r = run("data", "check", src, "--model", tiny_model, "--fix", tmp_path / "clean")
    assert r.exit_code == 1 and "3 rows dropped" in r.output
    assert tree_hash(src) == before
    clean = tmp_path / "clean"
    assert len((clean / "train.jsonl").read_text().splitlines()) == 2
    assert len((clean / "valid.jsonl").read_text().splitlines()) == 1
    log = [json.loads(line) for line in (clean / "fix_log.jsonl").read_text().splitlines()]
    assert {e["why"].split(" ")[0] for e in log} == {"invalid", "exact", "leakage:"}
    assert run("data", "check", clean, "--model", tiny_model).exit_code == 0
    again = run("data", "check", src, "--model", tiny_model, "--fix", clean)
    assert again.exit_code == 1 and "not empty" in again.output


def test_token_check_is_cached_by_content(tiny_model, tmp_path, monkeypatch):
    """prepare and the check/train that follow share one rendering: same rows, tokenizer, system
    prompt and max length -> the cached result (same problems, same locations); any change -> measured."""
    import mlxft.data.check as lint
    from mlxft.data.encode import load_tokenizer

    tokenizer, _ = load_tokenizer(str(tiny_model))
    monkeypatch.setenv("MLXFT_CACHE", str(tmp_path / "cache"))
    tmp_path = tmp_path / "data"
    tmp_path.mkdir()
    recipe = load_recipe("smollm2-135m", overrides=["train.max_seq_length=40"])
    convs = [[("user", f"q{i} " * (3 + 10 * (i % 3))), ("assistant", f"a{i}")] for i in range(12)]
    (tmp_path / "train.jsonl").write_text(rows(*convs))
    calls = []
    measure = lint._measure_tokens
    monkeypatch.setattr(lint, "_measure_tokens", lambda *a: calls.append(1) or measure(*a))
    first = check_path(tmp_path, recipe, tokenizer)
    second = check_path(tmp_path, recipe, tokenizer)
    assert len(calls) == 1
    assert [str(p) for p in first.problems] == [str(p) for p in second.problems]
    assert first.stats == second.stats and first.stats["train"]["truncated"] > 0
    other = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(other)  # the same rows elsewhere: reused, reported at their new location
    moved = check_path(other, recipe, tokenizer)
    truncations = [p for p in moved.problems if p.code == "truncation"]
    assert len(calls) == 1 and truncations and all(p.where.startswith(str(other)) for p in truncations)
    check_path(other, load_recipe("smollm2-135m", overrides=["train.max_seq_length=41"]), tokenizer)
    (other / "train.jsonl").write_text(rows(*convs[:-1], [("user", "changed"), ("assistant", "a11")]))
    check_path(other, recipe, tokenizer)
    assert len(calls) == 3
