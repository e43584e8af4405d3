"""`mlxft runs` lists runs with their key figures and status; `mlxft runs compare A B` diffs two."""

from __future__ import annotations

import json

from click.testing import CliRunner

from mlxft.cli import main
from mlxft.runs.compare import config_differences
from mlxft.runs.summary import overfitting_spans, read_metrics, summarize
from mlxft.runs.run import RunDir
from report_fixtures import make_config, make_eval, make_metrics, write_run


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def row_of(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(name + " "))


def test_runs_lists_key_figures_and_every_status(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a-finished", config=make_config(name="alpha"), metrics=make_metrics(), eval_json=make_eval())
    ctrl_c = make_metrics(steps=20, overfit=False) + [{"step": 20, "event": "interrupted"}]
    write_run(root, "b-interrupted", config=make_config(finished=False), metrics=ctrl_c, checkpoint_step=20)
    write_run(root, "b2-ctrl-c-just-now", config=make_config(finished=False), metrics=ctrl_c, checkpoint_step=20,
              age_seconds=0)
    write_run(root, "c-killed", config=make_config(finished=False), metrics=make_metrics(steps=20, overfit=False),
              checkpoint_step=20)
    diverged = make_metrics(steps=20, overfit=False) + [{"step": 23, "event": "diverged", "loss": "nan", "grad_norm": "nan"}]
    write_run(root, "d-diverged", config=make_config(finished=False), metrics=diverged, checkpoint_step=20)
    write_run(root, "e-killed-early", config=make_config(finished=False), metrics=make_metrics(steps=5, overfit=False))
    write_run(root, "e2-no-metrics", config=make_config(finished=False), metrics=None)
    write_run(root, "f-training", config=make_config(finished=False), metrics=make_metrics(steps=10, overfit=False),
              age_seconds=0)
    (root / "g-broken").mkdir()
    (root / "g-broken" / "config.json").write_text("{oops")
    (root / "not-a-run").mkdir()

    res = invoke("runs", "--runs-dir", str(root))
    assert res.exit_code == 0, res.output
    header = res.output.splitlines()[0].split()
    assert header[:4] == ["run", "recipe", "started", "steps"] and header[-3:] == ["eval", "gates", "status"]
    a = row_of(res.output, "a-finished")
    # recipe, date, steps, final train/val loss, best val @ step, tokens/s, eval headline, gates, status
    for expected in ("alpha", "2026-11-23 12:00", "40/40", "0.165", "3.000", "2.100@10", "240",
                     "commit-type exact_match 0.0% -> 86.2% (+86.2 pts)", "2/2 pass", "finished (overfit)"):
        assert expected in a, (expected, a)
    assert row_of(res.output, "b-interrupted").endswith(" interrupted")
    assert row_of(res.output, "b2-ctrl-c-just-now").endswith(" interrupted")  # Ctrl-C: not "running"
    assert row_of(res.output, "c-killed").endswith(" failed-resumable")
    assert row_of(res.output, "d-diverged").endswith(" diverged")
    assert row_of(res.output, "e-killed-early").endswith(" failed")
    assert row_of(res.output, "e2-no-metrics").endswith(" failed (no metrics yet)")
    assert row_of(res.output, "f-training").endswith(" running")
    assert "unreadable" in row_of(res.output, "g-broken") and "config.json cannot be read as JSON" in res.output
    assert "not-a-run" not in res.output


def test_runs_defaults_to_MLXFT_RUNS_and_says_when_there_are_none(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXFT_RUNS", str(tmp_path))
    res = invoke("runs")
    assert res.exit_code == 0 and "no runs yet" in res.output
    write_run(tmp_path, "x", metrics=make_metrics())
    assert "x " in invoke("runs").output
    res = invoke("runs", "--runs-dir", str(tmp_path / "missing"))
    assert res.exit_code == 1 and "no runs folder at" in res.output


def test_a_failing_gate_shows_in_the_list(tmp_path):
    write_run(tmp_path, "r", metrics=make_metrics(), eval_json=make_eval(passed=False))
    assert "1/2 pass FAIL" in invoke("runs", "--runs-dir", str(tmp_path)).output


def test_compare_shows_config_differences_metrics_and_eval_side_by_side(tmp_path):
    a = write_run(tmp_path, "a", config=make_config(lr=1e-3), metrics=make_metrics(), eval_json=make_eval())
    cfg_b = make_config(lr=3e-4)
    cfg_b["data"]["sha256"]["train"] = "f" * 64
    b = write_run(tmp_path, "b", config=cfg_b, metrics=make_metrics(overfit=False), eval_json=make_eval(passed=False))
    res = invoke("runs", "compare", str(a), str(b))
    assert res.exit_code == 0, res.output
    out = res.output
    diff_lines = out.split("config differences:")[1].split("metrics:")[0]
    assert "recipe.train.learning_rate  0.001" in diff_lines and "0.0003" in diff_lines
    assert "data.sha256.train" in diff_lines
    assert "recipe.train.seed" not in diff_lines  # equal keys are not listed
    assert "final val loss       3.000" in out and "0.900" in out
    assert "overfitting          yes" in out
    assert "perplexity   13.50 [12.00] pass  13.50 [12.00] FAIL" in out
    assert "exact_match  86.2% [0.0%] pass   86.2% [0.0%] pass" in out


def test_compare_bad_input_exits_1_with_a_message(tmp_path):
    a = write_run(tmp_path, "a", metrics=make_metrics())
    res = invoke("runs", "compare", str(a), str(tmp_path / "nope"))
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output
    b = write_run(tmp_path, "b", metrics=None)
    res = invoke("runs", "compare", str(a), str(b))
    assert res.exit_code == 1 and "has no training metrics yet" in res.output
    (tmp_path / "plain").mkdir()
    res = invoke("runs", "compare", str(tmp_path / "plain"), str(a))
    assert res.exit_code == 1 and "not an mlxft run folder" in res.output


def test_config_differences_include_added_and_removed_keys():
    a, b = make_config(), make_config()
    b["recipe"]["train"]["max_grad_norm"] = 1.0
    del b["versions"]["mlx-lm"]
    assert config_differences(a, b) == [("recipe.train.max_grad_norm", None, 1.0), ("versions.mlx-lm", "0.32.2", None)]


def test_overfitting_needs_a_real_rise_while_train_falls(tmp_path):
    def spans(val, train):
        run = write_run(tmp_path / str(len(list(tmp_path.iterdir()))), "r",
                        metrics=[{"step": s, "train_loss": t} for s, t in train] + [{"step": s, "val_loss": v} for s, v in val])
        return overfitting_spans(read_metrics(RunDir(run)))

    falling = [(s, 2.0 - s / 100) for s in range(5, 45, 5)]
    assert spans([(10, 1.0), (20, 1.2), (30, 1.4), (40, 1.6)], falling)[0]["from_step"] == 10
    assert not spans([(10, 1.0), (20, 1.005), (30, 1.01), (40, 1.015)], falling)  # within noise
    assert not spans([(10, 1.0), (20, 0.9), (30, 1.2)], falling)  # one check after the best is not a trend
    rising_train = [(s, 1.0 + s / 100) for s in range(5, 45, 5)]
    assert not spans([(10, 1.0), (20, 1.2), (30, 1.4), (40, 1.6)], rising_train)  # both rising: not overfitting


def test_summary_of_a_run_reads_its_best_and_peak_memory(tmp_path):
    run = write_run(tmp_path, "r", metrics=make_metrics(overfit=False))
    s = summarize(run)
    assert s.best_step == 40 and abs(s.best_val_loss - 0.9) < 1e-9
    assert abs(s.peak_memory_gb - 1.24) < 1e-9 and s.steps_done == 40 and s.status == "finished"
    assert json.loads((run / "config.json").read_text())["recipe"]["name"] == s.recipe
