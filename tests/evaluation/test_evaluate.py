"""mlxft eval on tiny models: suite loading errors, eval.json, gates -> exit code, the MLX judge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import SYSTEM
from lora_fixtures import make_adapter_run
from mlxft.cli import main
from mlxft.errors import ConfigError
from mlxft.evaluation.suites import list_suites, load_suite


def write_suite(path: Path, data: Path, scorers: str, extra: str = "") -> Path:
    path.write_text(f"name: tiny\ndescription: toy\ndata: {data}\ngeneration: {{max_tokens: 4, batch_size: 8}}\n"
                    f"{extra}scorers:\n{scorers}")
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_model, tiny_data, tmp_path_factory):
    return make_adapter_run(tmp_path_factory.mktemp("evalrun") / "run", tiny_model, seed=1,
                            system_prompt=SYSTEM, data_dir=tiny_data)


def test_shipped_suites_load():
    names = list_suites()
    for required in ("commit-type", "general", "safety", "structured-output", "general-judge"):
        assert required in names
    for name in names:
        suite = load_suite(name)
        assert suite.scorers and (suite.data is None or suite.data.is_file())


def test_suite_errors_name_file_and_key(tmp_path, tiny_data):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: nowhere.jsonl\nprompt: {sytem: none}\ngeneration: {max_tokens: -1}\n"
                   "scorers:\n  - {name: a, type: exact_mach}\n  - {name: b, type: regex}\n"
                   "  - {name: c, type: exact_match, gate: {minimum: 1}}\n")
    with pytest.raises(ConfigError) as e:
        load_suite(str(bad))
    msg = str(e.value)
    for part in ("data: data file not found", "prompt.sytem: unknown key", "generation.max_tokens: expected a positive int",
                 "scorers[0].type: unknown scorer type 'exact_mach'; did you mean 'exact_match'",
                 "scorers[1].pattern: missing", "scorers[2].gate.minimum: unknown gate rule"):
        assert f"{bad}: {part}" in msg, part
    bad.write_text("scorers: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+: invalid YAML"):
        load_suite(str(bad))
    bad.write_text(f"data: {tiny_data / 'test.jsonl'}\nscorers:\n  - {{type: refusal, gate: {{max_drop_points: eval.nope}}}}\n")
    with pytest.raises(ConfigError, match=r"scorers\[0\].gate.max_drop_points: expected a number or a recipe setting"):
        load_suite(str(bad))


def test_unknown_suite_suggests():
    with pytest.raises(ConfigError, match="Did you mean 'safety'"):
        load_suite("safty")


def test_eval_cli_writes_eval_json_and_gates_decide_exit(tiny_run, tiny_data, tmp_path):
    scorers = ("  - {name: em, type: exact_match}\n"
               "  - {name: label, type: label_accuracy, labels: [alpha, beta, gamma]}\n"
               "  - name: ppl\n    type: perplexity\n    gate: {max_rise_pct: RISE}\n")
    suite = write_suite(tmp_path / "s.yaml", tiny_data / "test.jsonl", scorers.replace("RISE", "1000000"))
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(tiny_run), "--suite", str(suite)])
    assert res.exit_code == 0, res.output
    assert "gates: all passed" in res.output and "base" in res.output and "adapter" in res.output
    data = json.loads((tiny_run / "eval.json").read_text())
    assert data["version"] == 2 and data["passed"] is True and data["run"] == str(tiny_run)
    entry = data["suites"]["tiny"]
    assert entry["n"] == 12 and set(entry["seconds"]) == {"base", "adapter"}
    by_name = {s["name"]: s for s in entry["scorers"]}
    assert set(by_name) == {"em", "label", "ppl"}
    for s in entry["scorers"]:
        assert {"name", "higher_is_better", "unit", "values", "delta", "gate", "details"} <= set(s)
        assert s["delta"] == pytest.approx(s["values"]["adapter"] - s["values"]["base"])
    conf = by_name["label"]["details"]["confusion"]
    assert conf["labels"] == ["alpha", "beta", "gamma"] and len(conf["base"]) == 3 and len(conf["adapter"]) == 3
    # The big random LoRA moves the perplexity of the references; a gate just tighter than that move fails.
    ppl = by_name["ppl"]["values"]
    rise_pct = 100 * (ppl["adapter"] / ppl["base"] - 1)
    assert abs(rise_pct) > 1
    for f in entry["failures"]:
        assert {"prompt", "reference", "base", "adapter", "scorer"} <= set(f)
    write_suite(tmp_path / "s.yaml", tiny_data / "test.jsonl", scorers.replace("RISE", f"{rise_pct - 1:.3f}"))
    res = runner.invoke(main, ["eval", str(tiny_run), "--suite", str(suite)])
    assert res.exit_code == 1, res.output
    assert "gates FAILED: tiny/ppl" in res.output and "FAIL" in res.output
    assert json.loads((tiny_run / "eval.json").read_text())["passed"] is False


def test_eval_data_override_and_model_against(tiny_run, tiny_model, tiny_data, tmp_path):
    suite = write_suite(tmp_path / "s.yaml", tiny_data / "test.jsonl",
                        "  - {name: em, type: exact_match, gate: {min_delta: 0.0}}\n")
    held = tmp_path / "held.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"beta {w}"}, {"role": "assistant", "content": "beta"}]}
            for w in ("q q", "r s")]
    held.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runner = CliRunner()
    res = runner.invoke(main, ["eval", str(tiny_run), "--suite", str(suite), "--data", str(held)])
    assert res.exit_code == 0, res.output
    assert json.loads((tiny_run / "eval.json").read_text())["suites"]["tiny"]["n"] == 2
    # A plain model against itself: both columns equal, the relative gate passes.
    res = runner.invoke(main, ["eval", str(tiny_model), "--suite", str(suite), "--against", str(tiny_model)])
    assert res.exit_code == 0, res.output
    assert "+0.0 pts" in res.output
    res = runner.invoke(main, ["eval", str(tiny_model)])
    assert res.exit_code == 1 and "name the suites" in res.output


def test_eval_bad_suite_is_one_message(tiny_run, tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("scorers: []\n")
    res = CliRunner().invoke(main, ["eval", str(tiny_run), "--suite", str(bad)])
    assert res.exit_code == 1 and "scorers: expected a non-empty list" in res.output
    assert "Traceback" not in res.output


def test_mlx_judge_on_tiny_model_is_order_swapped(tiny_run, tiny_data, tmp_path):
    from mlxft.evaluation.evaluate import compare_run

    (tmp_path / "t.j2").write_text("Question: {{ question }}\nA: {{ response_a }}\nB: {{ response_b }}\nBetter:")
    suite = write_suite(tmp_path / "j.yaml", tiny_data / "test.jsonl",
                        "  - {name: judged, type: judge, model: base, template: t.j2}\n")
    result = compare_run(tiny_run, [str(suite)], log=lambda *_: None)
    judged = result["suites"]["tiny"]["scorers"][0]
    d = judged["details"]
    assert d["wins"] + d["ties"] + d["losses"] == 12
    assert judged["values"]["adapter"] == pytest.approx((d["wins"] + 0.5 * d["ties"]) / 12)
    assert judged["values"]["base"] == pytest.approx(1 - judged["values"]["adapter"])
    # A random tiny judge mostly answers by position; the swap turns that into ties, not wins.
    assert d["ties"] >= 12 * (1 - d["consistency"]) - 1e-9


def test_shared_prefix_generation_matches_plain(tiny_model):
    from mlx_lm.utils import load

    from mlxft.data.encode import prompt_ids
    from mlxft.inference.batch import generate_batch

    model, tokenizer = load(str(tiny_model))
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": f"gamma x {w}"}], SYSTEM) for w in ("y", "z w", "x x x")]
    shared = generate_batch(model, tokenizer, prompts, 6, share_prefix=True)
    plain = generate_batch(model, tokenizer, prompts, 6, share_prefix=False)
    assert shared == plain


def test_perplexity_only_suite_on_a_plain_model(tiny_model, tmp_path):
    text = tmp_path / "prose.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("alpha beta gamma", "the cat sat on the mat")))
    suite = tmp_path / "p.yaml"
    suite.write_text(f"scorers:\n  - {{name: prose, type: perplexity, data: {text}, gate: {{max_rise_pct: 5}}}}\n")
    res = CliRunner().invoke(main, ["eval", str(tiny_model), "--suite", str(suite)])
    assert res.exit_code == 0, res.output  # a relative gate with nothing to compare with is n/a, not a failure
    assert "n/a" in res.output and "prose (lower is better)" in res.output


def test_few_shots_come_from_the_task_rows_not_mixed_in_replay_rows(tmp_path):
    import json

    from mlxft.evaluation.suites import FewShot, few_shot_turns

    def row(system, user, answer):
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                             {"role": "assistant", "content": answer}]}

    rows = [row("Label it.", f"commit {i}", "fix") for i in range(6)]
    rows += [row("You are a helpful assistant.", f"question {i}", "an answer") for i in range(3)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(5):
        turns = few_shot_turns(FewShot(data, 4, seed), exclude={"commit 0"})
        users = [t["content"] for t in turns if t["role"] == "user"]
        assert len(users) == 4 and all(u.startswith("commit") and u != "commit 0" for u in users)
