"""mlxft synth: every kept row is clean, unique, leak-free and traceable; reruns continue.

Logic tests drive a scripted teacher (a function of the attempt number); one test goes
through a real tiny MLX run (base + adapter) and the same run behind a loopback
OpenAI-compatible `mlxft serve`; a slow test uses the bundled SmolLM2 as teacher.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import LABELS, SYSTEM
from mlxft.cli import main
from mlxft.errors import DataError
from mlxft.data.check import check_path
from mlxft.data.synth import Judge, SynthOptions, synthesize
from mlxft.data.teacher import FunctionTeacher, HttpTeacher, LocalTeacher, TeacherSampling
from tiny_run import train_tiny_run

ATTEMPT_TEMPLATE = "attempt={{ attempt }} topic={{ prompt }}"


def scripted(replies: dict | list, batch_size: int = 8, crash_at: int | None = None, calls: list | None = None):
    """A teacher whose reply depends only on the attempt number the template put in the prompt."""

    def fn(conv):
        a = int(re.search(r"attempt=(\d+)", conv[-1]["content"]).group(1))
        if calls is not None:
            calls.append(a)
        if crash_at is not None and a >= crash_at:
            raise KeyboardInterrupt  # the process dies mid-batch
        return replies.get(a, "(not needed)") if isinstance(replies, dict) else replies[a % len(replies)]

    teacher = FunctionTeacher(fn, name="scripted")
    teacher.batch_size = batch_size
    return teacher


class LabelFilter:
    name = "labels"

    def __init__(self, allowed):
        self.allowed = set(allowed)

    def reasons(self, rows):
        return [None if r["messages"][-1]["content"] in self.allowed else
                f"{r['messages'][-1]['content']!r} is not one of the labels" for r in rows]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _write_template(tmp_path) -> Path:
    t = tmp_path / "t.j2"
    t.write_text(ATTEMPT_TEMPLATE)
    return t


@pytest.fixture
def seeds(tmp_path) -> Path:
    p = tmp_path / "seeds.txt"
    p.write_text("a crash on login\n\nnew settings page\n")
    return p


def test_every_reject_has_its_reason_and_kept_rows_are_clean_and_traceable(tmp_path, seeds):
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"messages": [{"role": "user", "content": "Leaky question"},
                                             {"role": "assistant", "content": "fix"}]}) + "\n")
    replies = {
        0: '{"user": "Fix the login crash", "assistant": "fix"}',
        1: "Sure! Here is an example: user asks, assistant answers.",
        2: '{"user": "fix the LOGIN crash!", "assistant": "fix"}',
        3: '```json\n{"messages": [{"role": "user", "content": "Add dark mode"}, '
           '{"role": "assistant", "content": "feat"}]}\n```',
        4: '{"user": "leaky question?", "assistant": "docs"}',
        5: '{"user": "Write the docs", "assistant": "  "}',
        6: '{"user": "Update README", "assistant": "banana"}',
        7: 'Here: {"instruction": "Speed up the parser", "output": "perf"} done',
        8: '{"foo": 1}',
        9: '{"user": "Fix the login crash", "assistant": "feat"}',
        10: '{"user": "Bump numpy", "assistant": "build"}',
    }
    opts = SynthOptions(seeds, 4, tmp_path / "out", template=_write_template(tmp_path), system=SYSTEM, against=(test,))
    res = synthesize(opts, scripted(replies), [LabelFilter(["fix", "feat", "perf", "build", "docs"])], progress=False,
                     log=lambda *_: None)
    assert res.complete and res.kept == 4 and res.attempts == 11
    rows, rejects = _jsonl(tmp_path / "out" / "synth.jsonl"), _jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [(r["metadata"]["synth"]["attempt"], r["messages"][1]["content"]) for r in rows] == [
        (0, "Fix the login crash"), (3, "Add dark mode"), (7, "Speed up the parser"), (10, "Bump numpy")]
    assert {r["attempt"]: r["reason"] for r in rejects} == {
        1: "format", 2: "duplicate", 4: "leakage", 5: "schema", 6: "filter:labels", 8: "format", 9: "duplicate"}
    why = {r["attempt"]: r["message"] for r in rejects}
    assert "near duplicate" in why[2] and "attempt 0" in why[2]
    assert "same prompt" in why[9] and "test.jsonl:1" in why[4] and "empty content" in why[5]
    assert all(r["reply"] == replies[r["attempt"]] for r in rejects)  # the teacher's own words are kept
    # provenance: teacher, template hash, seed (cycled over the two non-empty lines)
    sha = hashlib.sha256(ATTEMPT_TEMPLATE.encode()).hexdigest()
    for r in rows:
        p = r["metadata"]["synth"]
        assert p["teacher"] == "scripted" and p["template_sha256"] == sha
        assert p["seed"]["index"] == p["attempt"] % 2 and p["seed"]["where"].endswith(f"seeds.txt:{[1, 3][p['seed']['index']]}")
        assert r["messages"][0] == {"role": "system", "content": SYSTEM}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["kept"] == 4 and manifest["rejected"] == 7 and manifest["complete"]
    assert manifest["rejected_by_reason"] == {"format": 2, "duplicate": 2, "leakage": 1, "schema": 1, "filter:labels": 1}
    assert manifest["settings"]["template_sha256"] == sha and manifest["against_rows"] == 1
    # the kept file passes `mlxft data check` as it is (provenance lives in the ignored "metadata" key)
    report = check_path(tmp_path / "out" / "synth.jsonl")
    assert report.ok and not [p for p in report.problems if p.code != "tokens"], [str(p) for p in report.problems]


def test_rows_that_only_echo_the_prompt_are_rejected(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"messages": [{"role": "user", "content": "Fix the login crash"},
                                              {"role": "assistant", "content": "fix"}]}) + "\n")
    replies = iter(['{"user": "<the user message>", "assistant": "<the assistant reply>"}',  # the format line
                    '{"user": "Fix the login crash", "assistant": "fix"}',  # the seed example itself
                    '{"user": "Same words", "assistant": "same words."}',
                    '{"user": "Fix the logout crash", "assistant": "fix"}'])
    res = synthesize(SynthOptions(seeds, 1, tmp_path / "out"), FunctionTeacher(lambda c: next(replies)),
                     progress=False, log=lambda *_: None)
    assert res.kept == 1 and res.reasons == {"echo": 3}
    why = [r["message"] for r in _jsonl(tmp_path / "out" / "rejects.jsonl")]
    assert why == ["the row only copies the teacher's prompt (its placeholders or the seed example)"] * 2 + [
        "the answer repeats the user message"]


def test_a_rerun_continues_after_a_crash_with_no_duplicates(tmp_path, seeds):
    replies = [f'{{"user": "message {i}", "assistant": "fix"}}' for i in range(7)] + ["junk"]
    template = _write_template(tmp_path)
    quiet = dict(progress=False, log=lambda *_: None)
    straight = synthesize(SynthOptions(seeds, 6, tmp_path / "a", template=template), scripted(replies, 2), **quiet)
    assert straight.kept == 6

    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        synthesize(SynthOptions(seeds, 6, out, template=template), scripted(replies, 2, crash_at=4), **quiet)
    assert len(_jsonl(out / "synth.jsonl")) == 4
    assert json.loads((out / "manifest.json").read_text())["kept"] == 4  # written on the way out, too
    with open(out / "synth.jsonl", "ab") as f:
        f.write(b'{"messages": [{"role": "us')  # killed in the middle of an append
    calls: list[int] = []
    res = synthesize(SynthOptions(seeds, 6, out, template=template), scripted(replies, 2, calls=calls), **quiet)
    assert res.resumed_from == 4 and calls[0] == 4  # nothing before the crash is asked again
    assert _jsonl(out / "synth.jsonl") == _jsonl(tmp_path / "a" / "synth.jsonl")
    assert _jsonl(out / "rejects.jsonl") == _jsonl(tmp_path / "a" / "rejects.jsonl")

    calls.clear()  # the same command again: already complete, the teacher is not called
    assert synthesize(SynthOptions(seeds, 6, out, template=template), scripted(replies, 2, calls=calls), **quiet).kept == 6
    assert calls == []
    res = synthesize(SynthOptions(seeds, 7, out, template=template), scripted(replies, 2), **quiet)
    assert res.kept == 7 and res.complete
    rows = _jsonl(out / "synth.jsonl")
    attempts = [r["metadata"]["synth"]["attempt"] for r in rows] + [r["attempt"] for r in _jsonl(out / "rejects.jsonl")]
    assert len(attempts) == len(set(attempts))
    assert len({r["messages"][0]["content"] for r in rows}) == len(rows) == 7

    with pytest.raises(DataError, match="other settings.*template_sha256"):
        synthesize(SynthOptions(seeds, 8, out), scripted(replies), **quiet)
    rows[0].pop("metadata")  # hand-edited: the record no longer says which attempt it was
    (out / "synth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="synth.jsonl:1: not a record mlxft synth wrote"):
        synthesize(SynthOptions(seeds, 8, out, template=template), scripted(replies), **quiet)


def test_attempts_run_out_with_a_clear_count(tmp_path, seeds):
    logs = []
    res = synthesize(SynthOptions(seeds, 3, tmp_path / "out", template=_write_template(tmp_path), max_attempts=5),
                     scripted(["nope"]), progress=False, log=logs.append)
    assert not res.complete and res.kept == 0 and res.attempts == 5 and res.reasons == {"format": 5}
    assert any("0 of 3 rows" in line and "format 5" in line for line in logs)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is False


def test_judge_keeps_rows_at_or_above_the_threshold(tmp_path, seeds):
    replies = ['{"user": "Fix crash %d", "assistant": "%s"}' % (i, label) for i, label in enumerate(["feat", "docs", "fix"])]
    seen = []

    def grade(conv):
        seen.append(conv[0]["content"])
        answer = re.search(r"Assistant: (\w+)", conv[0]["content"]).group(1)
        return {"fix": "9", "feat": "Score: 3/10"}.get(answer, "I cannot rate this.")

    judge = Judge(FunctionTeacher(grade, "grader"), threshold=7)
    res = synthesize(SynthOptions(seeds, 1, tmp_path / "out", template=_write_template(tmp_path), system=SYSTEM,
                                  max_attempts=3), scripted(replies), judge=judge, progress=False, log=lambda *_: None)
    assert res.kept == 1
    rows, rejects = _jsonl(tmp_path / "out" / "synth.jsonl"), _jsonl(tmp_path / "out" / "rejects.jsonl")
    assert rows[0]["metadata"]["synth"]["judge_score"] == 9
    assert [(r["reason"], r["message"]) for r in rejects] == [
        ("judge", "judge score 3 < threshold 7"), ("judge", "the judge's reply holds no 1-10 score")]
    assert "User: Fix crash 2" in seen[2] and SYSTEM in seen[2]  # the rubric saw the row and the task
    settings = json.loads((tmp_path / "out" / "manifest.json").read_text())["settings"]
    assert settings["judge"]["judge"] == "grader" and settings["judge"]["threshold"] == 7


def test_seed_rows_feed_the_template_and_answer_mode_keeps_their_prompt(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "old"}, {"role": "user", "content": "first question"},
                      {"role": "assistant", "content": "a1"}]},
        {"instruction": "second question", "output": "a2"},
        {"topic": "third question"},
        "fourth question",
    ]) + "\n")
    asked = []

    def answer(conv):
        asked.append(conv)
        return "ANSWER to " + conv[-1]["content"]

    res = synthesize(SynthOptions(seeds, 10, tmp_path / "out", mode="answer", system=SYSTEM),
                     FunctionTeacher(answer), progress=False, log=lambda *_: None)
    assert res.kept == 4 and not res.complete and res.attempts == 4  # answer mode: one attempt per seed
    assert [c[-1]["content"] for c in asked] == ["first question", "second question", "third question", "fourth question"]
    rows = _jsonl(tmp_path / "out" / "synth.jsonl")
    assert rows[0]["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first question"},
                                   {"role": "assistant", "content": "ANSWER to first question"}]

    out = tmp_path / "gen"
    prompts = []
    teacher = FunctionTeacher(lambda c: prompts.append(c[-1]["content"]) or '{"user": "u%d", "assistant": "a"}' % len(prompts))
    synthesize(SynthOptions(seeds, 2, out, system=SYSTEM), teacher, progress=False, log=lambda *_: None)
    assert "User: first question" in prompts[0] and "Assistant: a1" in prompts[0] and SYSTEM in prompts[0]
    assert "topic: third question" in prompts[2] and "Assistant:" not in prompts[2].split("topic:")[1]


def test_bad_input_is_one_clear_message(tmp_path, seeds):
    def run(*args):
        r = CliRunner().invoke(main, ["synth", *args], catch_exceptions=False)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        return r.output

    base = ["--teacher", "http://127.0.0.1:9/v1", "--n", "2"]
    assert "seeds file not found" in run(str(tmp_path / "o1"), *base, "--seeds", str(tmp_path / "nope.txt"))
    bad = tmp_path / "bad.j2"
    bad.write_text("{% if %}")
    assert "bad.j2:1: template syntax error" in run(str(tmp_path / "o2"), *base, "--seeds", str(seeds), "--template", str(bad))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"nope": 1}\n')
    assert "rows.jsonl:2" in run(str(tmp_path / "o3"), *base, "--seeds", str(rows))
    undefined = tmp_path / "u.j2"
    undefined.write_text("{{ topik }}")
    out = run(str(tmp_path / "o4"), *base, "--seeds", str(seeds), "--template", str(undefined))
    assert "'topik' is undefined" in out or "cannot reach the teacher" in out
    assert "cannot reach the teacher at http://127.0.0.1:9/v1" in run(str(tmp_path / "o5"), *base, "--seeds", str(seeds))
    (tmp_path / "o6").mkdir()
    (tmp_path / "o6" / "mine.txt").write_text("x")
    assert "not an mlxft synth folder" in run(str(tmp_path / "o6"), *base, "--seeds", str(seeds))


def _suite(tmp_path, data: Path) -> Path:
    suite = tmp_path / "toy.yaml"
    suite.write_text(f"""
name: toy
data: {data}
scorers:
  - {{name: labels, type: label_accuracy, labels: [alpha, beta, gamma]}}
  - {{name: shape, type: json_schema, schema: {{type: object, required: [label], properties: {{label: {{enum: [a, b]}}}}}}}}
  - {{name: exact, type: exact_match}}
  - {{name: keywords, type: contains_any, field: keywords}}
""")
    return suite


def test_eval_suite_scorers_filter_rows_and_refuse_what_needs_a_reference(tmp_path, tiny_data):
    from mlxft.errors import ConfigError
    from mlxft.data.synth_checks import SuiteFilter

    suite = _suite(tmp_path, tiny_data / "test.jsonl")
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]}
            for a in ("Beta.", "beta gamma", '{"label": "a"}', '```json\n{"label": "c"}\n```')]
    labels = SuiteFilter(f"{suite}:labels")
    assert labels.name == "toy:labels" and labels.data == tiny_data / "test.jsonl"
    verdicts = labels.reasons(rows)
    assert verdicts[0] is None and "not one of the labels (alpha, beta, gamma)" in verdicts[1]
    shape = SuiteFilter(f"{suite}:shape").reasons(rows)
    assert shape[2] is None and "not JSON" in shape[0] and "label: 'c' is not one of ['a', 'b']" in shape[3]
    with pytest.raises(ConfigError, match="needs a reference answer"):
        SuiteFilter(f"{suite}:exact")
    with pytest.raises(ConfigError, match="takes its phrases from each eval row's 'keywords'"):
        SuiteFilter(f"{suite}:keywords")
    with pytest.raises(ConfigError, match="has no scorer 'nope'; its scorers: labels, shape, exact, keywords"):
        SuiteFilter(f"{suite}:nope")
    with pytest.raises(ConfigError, match="SUITE:SCORER"):
        SuiteFilter("labels")


# ---------------------------------------------------------------- real teachers: a tiny MLX run, the same behind HTTP


@pytest.fixture(scope="module")
def trained_run(tiny_model, tiny_data, tmp_path_factory):
    return train_tiny_run(tiny_model, tiny_data, tmp_path_factory.mktemp("synth-runs"))


def _answer_seeds(tiny_data, path: Path) -> Path:
    train = _jsonl(tiny_data / "train.jsonl")
    test = _jsonl(tiny_data / "test.jsonl")
    prompts = [r["messages"][1]["content"] for r in train[:6]]
    prompts += [test[0]["messages"][1]["content"], prompts[0].upper() + "!"]  # a test prompt; a near duplicate
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    return path


def test_a_local_run_and_the_same_run_behind_mlxft_serve_make_the_same_rows(trained_run, tiny_data, tmp_path):
    from mlxft.inference.serve import load_engine, make_server

    seeds = _answer_seeds(tiny_data, tmp_path / "seeds.jsonl")
    greedy = TeacherSampling(temp=0.0, top_p=1.0, max_tokens=8)

    def opts(out):
        return SynthOptions(seeds, 8, tmp_path / out, mode="answer", system=SYSTEM, against=(tiny_data / "test.jsonl",),
                            sampling=greedy)

    local = synthesize(opts("local"), LocalTeacher(str(trained_run)), [LabelFilter(LABELS)], progress=False,
                       log=lambda *_: None)
    rows = _jsonl(tmp_path / "local" / "synth.jsonl")
    rejects = {r["attempt"]: r for r in _jsonl(tmp_path / "local" / "rejects.jsonl")}
    assert rejects[6]["reason"] == "leakage" and rejects[7]["reason"] == "duplicate"
    assert local.kept == len(rows) >= 4  # the run learned the task: most answers are labels that end cleanly
    assert all(r["messages"][-1]["content"] in LABELS for r in rows)
    assert all(r["metadata"]["synth"]["teacher"] == str(trained_run) for r in rows)
    assert all(rejects[a]["reason"] == "filter:labels" for a in set(range(6)) - {r["metadata"]["synth"]["attempt"] for r in rows})

    engine = load_engine(None, [("tiny", str(trained_run))], log=lambda *_: None)
    server = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        teacher = HttpTeacher(f"http://127.0.0.1:{server.server_address[1]}/v1", "tiny")
        synthesize(opts("http"), teacher, [LabelFilter(LABELS)], progress=False, log=lambda *_: None)
    finally:
        server.shutdown()
        server.server_close()
        engine.stop()
    http_rows = _jsonl(tmp_path / "http" / "synth.jsonl")
    assert [r["messages"] for r in http_rows] == [r["messages"] for r in rows]  # same model, same prompt ids
    assert http_rows[0]["metadata"]["synth"]["teacher"].endswith("(tiny)")


def test_cli_synth_with_a_run_as_teacher(trained_run, tiny_data, tmp_path):
    seeds = _answer_seeds(tiny_data, tmp_path / "seeds.jsonl")
    args = ["synth", str(tmp_path / "out"), "--teacher", str(trained_run), "--seeds", str(seeds), "--n", "3",
            "--mode", "answer", "--temp", "0", "--max-tokens", "8", "--against", str(tiny_data / "valid.jsonl"),
            "--filter", f"{_suite(tmp_path, tiny_data / 'test.jsonl')}:labels"]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "3 rows in" in r.output
    assert len(_jsonl(tmp_path / "out" / "synth.jsonl")) == 3
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["against_rows"] == 16 + 12  # valid, and the suite's own test data added by --filter
    assert manifest["settings"]["template"] == "packaged synth_answer.j2"
    assert manifest["settings"]["filters"] == ["toy:labels"]

    # the same run as judge (loaded once): it answers labels, not 1-10 scores, so every row is rejected as unjudged
    r = CliRunner().invoke(main, [args[0], str(tmp_path / "judged"), *args[2:], "--judge", str(trained_run),
                                  "--max-attempts", "2"], catch_exceptions=False)
    assert r.exit_code == 1 and "0 of 3 rows (rejected: judge 2)" in r.output, r.output

    folder = ["--against", str(tiny_data)]  # a folder: its valid and test splits (train rows are no leakage)
    r = CliRunner().invoke(main, [*args[:-4], *folder, "--n", "2", "--max-attempts", "3"], catch_exceptions=False)
    assert r.exit_code == 1 and "other settings (against, filters differ)" in r.output, r.output


def test_recipe_gives_the_system_prompt_and_its_eval_splits(tmp_path, tiny_model, tiny_data, seeds):
    from mlxft.data.synth import _with_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: tiny\nmodel: {{source: '{tiny_model}', family: llama}}\n"
                      f"data: {{path: '{tiny_data}', system_prompt: '{SYSTEM}'}}\n")
    opts = _with_recipe(SynthOptions(seeds, 1, tmp_path / "out"), str(recipe))
    assert opts.system == SYSTEM and opts.against == (tiny_data / "valid.jsonl", tiny_data / "test.jsonl")
    opts = _with_recipe(SynthOptions(seeds, 1, tmp_path / "out", system="Mine."), str(recipe))
    assert opts.system == "Mine."  # an explicit --system wins


def test_packaged_templates_are_installed():
    for name in ("synth_default.j2", "synth_answer.j2", "synth_judge.j2"):
        assert (files("mlxft") / "templates" / name).read_text().strip()


@pytest.mark.slow
def test_smollm2_as_teacher_answers_and_its_rows_pass_the_checks(tmp_path):
    seeds = tmp_path / "questions.txt"
    seeds.write_text("What is the capital of France?\nWhat is 2 + 2?\nName one primary color.\n")
    res = synthesize(SynthOptions(seeds, 3, tmp_path / "out", mode="answer",
                                  sampling=TeacherSampling(temp=0.0, top_p=1.0, max_tokens=64)),
                     LocalTeacher("builtin:smollm2-135m-instruct"), progress=False, log=lambda *_: None)
    rows = _jsonl(tmp_path / "out" / "synth.jsonl")
    rejects = _jsonl(tmp_path / "out" / "rejects.jsonl")
    assert res.attempts == 3 and len(rows) + len(rejects) == 3
    france = [r for r in rows if "France" in r["messages"][0]["content"]]
    assert france and "Paris" in france[0]["messages"][-1]["content"]
    assert all(r["reason"] and r["reply"] for r in rejects)
    assert check_path(tmp_path / "out" / "synth.jsonl").ok
