"""mlxft baseline: zero-shot and few-shot base-model scores before training, few-shot examples from the
training split only, gate verdicts, and the baseline columns in eval.json, `mlxft eval` and the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import LABELS, SYSTEM
from mlxft.evaluation.baseline import column, format_baseline, merge_for_run, prompting_setups, score_setups, verdict
from mlxft.cli import main
from mlxft.errors import DataError
from mlxft.runs.run import Run, RunDir
from tiny_run import train_tiny_run


def write_recipe(tmp_path: Path, model: Path, data: Path, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nmodel: {{source: '{model}', family: llama}}\n"
        "lora: {targets: [self_attn.q_proj, self_attn.v_proj, mlp.down_proj], rank: 4, alpha: 8, num_layers: 2}\n"
        "train: {iters: 2, batch_size: 8, max_seq_length: 64}\n"
        f"data: {{path: '{data}', system_prompt: '{SYSTEM}'}}\n")
    return path


def write_suite(tmp_path: Path, data: Path, gate: str = "{min: 0.5}", name: str = "toy") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\ndescription: toy labels\ndata: {data}\ngeneration: {{max_tokens: 4}}\n"
                    f"scorers:\n  - {{name: accuracy, type: label_accuracy, labels: [{', '.join(LABELS)}], gate: {gate}}}\n")
    return path


def _users(path: Path) -> set[str]:
    return {m["content"] for line in path.read_text().splitlines() for m in json.loads(line)["messages"]
            if m["role"] == "user"}


def test_few_shot_examples_come_from_the_training_split_only(tmp_path, tiny_data):
    from mlxft.evaluation.suites import load_suite

    suite = load_suite(str(write_suite(tmp_path, tiny_data / "test.jsonl")))
    setups = prompting_setups(suite, tiny_data / "train.jsonl", 3, seed=1, system_prompt=SYSTEM)
    assert list(setups) == ["base 0-shot", "base 3-shot"]
    zero, three = setups["base 0-shot"], setups["base 3-shot"]
    assert len(zero) == len(three) == 12
    assert [m["role"] for m in zero[0].messages] == ["system", "user"]
    assert [m["role"] for m in three[0].messages] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    shots = {m["content"] for m in three[0].messages[1:-1] if m["role"] == "user"}
    assert shots <= _users(tiny_data / "train.jsonl") and not shots & _users(tiny_data / "test.jsonl")
    assert all(e.messages[1:-1] == three[0].messages[1:-1] for e in three)  # the same shots for every row

    with pytest.raises(DataError, match="which is the suite's test data"):
        prompting_setups(suite, tiny_data / "test.jsonl", 3)
    # a training split that holds test prompts (up to case and punctuation) never lends them as shots
    leaky = tmp_path / "leaky"
    leaky.mkdir()
    rows = [json.loads(line) for line in (tiny_data / "test.jsonl").read_text().splitlines()[:3]]
    for r in rows:
        r["messages"][1]["content"] = r["messages"][1]["content"].upper() + "!"
    (leaky / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="also a prompt of the test data"):
        prompting_setups(suite, leaky / "train.jsonl", 3)
    with pytest.raises(DataError, match="does not exist"):
        prompting_setups(suite, tmp_path / "nope.jsonl", 3)


def test_gate_verdicts_say_plainly_whether_fine_tuning_is_needed(tmp_path, tiny_data):
    from mlxft.config import EvalConfig
    from mlxft.evaluation.sides import Side
    from mlxft.evaluation.suites import load_suite

    def entry(gate, zero_answers, few_answers):
        suite = load_suite(str(write_suite(tmp_path, tiny_data / "test.jsonl", gate)))
        setups = prompting_setups(suite, tiny_data / "train.jsonl", 3)
        refs = [e.reference for e in setups["base 0-shot"]]
        sides = {"base 0-shot": Side(zero_answers(refs)), "base 3-shot": Side(few_answers(refs))}
        return score_setups(suite, setups, sides, EvalConfig())

    wrong = lambda refs: ["nothing"] * len(refs)  # noqa: E731
    half = lambda refs: [r if i % 2 == 0 else "nothing" for i, r in enumerate(refs)]  # noqa: E731
    e = entry("{min: 0.5}", wrong, half)
    assert e["scorers"][0]["values"] == {"base 0-shot": 0.0, "base 3-shot": 0.5}
    assert e["meets_gates"] == {"base 0-shot": False, "base 3-shot": True}
    assert verdict(e) == ("prompting the base model (base 3-shot) already meets every gate of toy: "
                          "fine-tuning is not needed for this suite")
    assert "PASS" in format_baseline(e) and "FAIL/PASS" in format_baseline(e)
    e = entry("{min: 0.9}", wrong, half)
    assert e["meets_gates"] == {"base 0-shot": False, "base 3-shot": False}
    assert verdict(e) == "no prompting setup (base 0-shot, base 3-shot) meets the gates of toy: fine-tune"
    e = entry("{min_delta: 0.4}", wrong, half)  # relative gates measure a setup against the zero-shot base
    assert e["scorers"][0]["gates"]["base 3-shot"]["passed"] and e["meets_gates"]["base 3-shot"]
    assert e["scorers"][0]["gates"]["base 0-shot"]["passed"] is False
    e = entry("null", wrong, half)
    assert e["meets_gates"] == {"base 0-shot": None, "base 3-shot": None} and "no gates" in verdict(e)


def test_cli_baseline_before_any_run_records_in_runs_baselines(tmp_path, tiny_model, tiny_data):
    recipe, suite = write_recipe(tmp_path, tiny_model, tiny_data), write_suite(tmp_path, tiny_data / "test.jsonl")
    runs = tmp_path / "runs"
    r = CliRunner().invoke(main, ["baseline", str(recipe), "--suite", str(suite), "--shots", "3", "--runs-dir", str(runs)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "base 0-shot" in r.output and "base 3-shot" in r.output and "fine-tune" in r.output
    data = json.loads((runs / "baselines" / "tiny.json").read_text())
    assert data["base_model"] == str(tiny_model) and data["recipe"] == "tiny"
    entry = data["suites"]["toy"]
    assert entry["n"] == 12 and entry["columns"] == ["base 0-shot", "base 3-shot"]
    assert entry["few_shot_data"] == str(tiny_data / "train.jsonl")
    assert set(entry["scorers"][0]["values"]) == {"base 0-shot", "base 3-shot"}
    # another shot count adds its column beside the earlier ones
    r = CliRunner().invoke(main, ["baseline", str(recipe), "--suite", str(suite), "--shots", "1", "--runs-dir", str(runs)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    entry = json.loads((runs / "baselines" / "tiny.json").read_text())["suites"]["toy"]
    assert entry["columns"] == ["base 0-shot", "base 3-shot", "base 1-shot"]
    assert set(entry["scorers"][0]["values"]) == {"base 0-shot", "base 3-shot", "base 1-shot"}

    r = CliRunner().invoke(main, ["baseline", str(recipe), "--suite", "no-such-suite"], catch_exceptions=False)
    assert r.exit_code == 1 and "unknown eval suite 'no-such-suite'" in r.output and "Traceback" not in r.output


@pytest.fixture(scope="module")
def trained(tiny_model, tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline-runs")
    return train_tiny_run(tiny_model, tiny_data, root / "runs")


def test_eval_and_report_show_baseline_columns_beside_base_and_adapter(tmp_path, tiny_model, tiny_data, trained):
    runs = tmp_path / "runs"
    run = runs / trained.name
    shutil.copytree(trained, run)
    recipe, suite = write_recipe(tmp_path, tiny_model, tiny_data), write_suite(tmp_path, tiny_data / "test.jsonl")
    invoke = lambda *args: CliRunner().invoke(main, list(args), catch_exceptions=False)  # noqa: E731
    r = invoke("baseline", str(recipe), "--suite", str(suite), "--runs-dir", str(runs))
    assert r.exit_code == 0, r.output

    r = invoke("eval", str(run), "--suite", str(suite))
    ev = json.loads((run / "eval.json").read_text())
    scorer = ev["suites"]["toy"]["scorers"][0]
    assert list(scorer["values"]) == ["base", "base 0-shot", "base 3-shot", "adapter"]
    assert scorer["values"]["base 0-shot"] == scorer["values"]["base"]  # the same model and prompts as eval's base
    assert scorer["values"]["adapter"] > scorer["values"]["base"]
    assert ev["suites"]["toy"]["baseline"]["verdict"] in r.output and "base 3-shot" in r.output

    # recording into an existing run: RUN/baseline.json and straight into its eval.json
    r = invoke("baseline", "--run", str(run), "--suite", str(suite), "--shots", "2")
    assert r.exit_code == 0, r.output and "and its eval.json" in r.output
    assert json.loads((run / "baseline.json").read_text())["suites"]["toy"]["columns"] == ["base 0-shot", "base 2-shot"]
    scorer = json.loads((run / "eval.json").read_text())["suites"]["toy"]["scorers"][0]
    assert list(scorer["values"]) == ["base", "base 0-shot", "base 2-shot", "base 3-shot", "adapter"]

    from mlxft.runs.report import write_report

    html = Path(write_report(run)).read_text()
    assert "base 2-shot" in html and "fine-tune" in html


def test_a_baseline_of_another_base_model_is_not_merged(tmp_path, trained):
    run = Run.open(trained)
    (trained.parent / "baselines").mkdir(exist_ok=True)
    (trained.parent / "baselines" / "tiny.json").write_text(json.dumps(
        {"version": 1, "recipe": "tiny", "base_model": "builtin:other", "suites": {"toy": {}}}))
    result = {"suites": {"toy": {"data": "x", "scorers": [{"name": "accuracy", "values": {"base": 0, "adapter": 1}}]}}}
    merge_for_run(result, run)
    assert "baseline" not in result["suites"]["toy"]
    assert column(5) == "base 5-shot"


@pytest.mark.slow
def test_smollm2_commit_type_zero_and_three_shot(tmp_path):
    """The bundled model on (the first 32 rows of) commit-type: prompting alone is far from the gates."""
    from mlxft.evaluation.baseline import resolve_target, run_baseline
    from mlxft.evaluation.suites import EVALS_DIR

    text = (EVALS_DIR / "commit-type.yaml").read_text()
    data = (EVALS_DIR / "../datasets/commit-type/test.jsonl").resolve()
    suite = tmp_path / "commit-type.yaml"
    suite.write_text(text.replace("data: ../datasets/commit-type/test.jsonl", f"data: {data}\nlimit: 32"))
    target = resolve_target("smollm2-135m", runs_dir=tmp_path / "runs")
    entry = run_baseline(target, str(suite), shots=3, log=lambda *_: None)
    values = {s["name"]: s["values"] for s in entry["scorers"]}
    assert entry["n"] == 32 and set(values["label_accuracy"]) == {"base 0-shot", "base 3-shot"}
    assert all(0.0 <= v <= 1.0 for vs in values.values() for v in vs.values())
    assert entry["meets_gates"] == {"base 0-shot": False, "base 3-shot": False}
    assert verdict(entry).endswith("fine-tune")
    from mlxft.recipes import load_recipe

    assert entry["few_shot_data"].endswith(load_recipe("smollm2-135m").data.path + "/train.jsonl")
    assert (tmp_path / "runs" / "baselines" / "smollm2-135m.json").is_file()


def test_a_run_without_a_data_path_is_one_clear_message(tmp_path, tiny_model):
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"recipe": {"name": "x", "model": {"source": str(tiny_model)}},
                                                 "data": {"path": None}}))
    r = CliRunner().invoke(main, ["baseline", "--run", str(run), "--suite", "commit-type"], catch_exceptions=False)
    assert r.exit_code == 1 and "records no data path" in r.output and "Traceback" not in r.output
