"""A run folder written by another mlxft version: read when its format is known, else refused,
the message naming both versions; a damaged config.json is one message, not a traceback."""

import json

import pytest
from click.testing import CliRunner
from lora_fixtures import make_adapter_run

import mlxft
from conftest import SYSTEM
from mlxft.cli import main
from mlxft.runs.format import RUN_FORMAT, RunFormatError, version_note
from mlxft.runs.run import RunDir


@pytest.fixture
def run(tiny_model, tmp_path):
    return make_adapter_run(tmp_path / "run", tiny_model, seed=1, system_prompt=SYSTEM)


def rewrite(run, **changes):
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(changes)
    (run / "config.json").write_text(json.dumps(cfg))
    return cfg


def test_a_newer_run_format_is_refused_naming_both_versions(run):
    rewrite(run, run_format=RUN_FORMAT + 1, versions={"mlxft": "9.3.0"})
    with pytest.raises(RunFormatError) as e:
        RunDir.open(run).read_config()
    msg = str(e.value)
    assert "mlxft 9.3.0" in msg and f"mlxft {mlxft.__version__}" in msg and "upgrade mlxft" in msg
    for cmd in (["generate", str(run), "-p", "hi"], ["serve", "--adapter", f"a={run}"], ["report", str(run)],
                ["runs", "compare", str(run), str(run)]):
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (cmd, res.output)
        assert "mlxft 9.3.0" in res.output and mlxft.__version__ in res.output, (cmd, res.output)


def test_an_older_version_in_a_known_format_is_read_with_a_note(run):
    cfg = rewrite(run, versions={"mlxft": "0.0.9"})
    assert RunDir.open(run).read_config()["recipe"] == cfg["recipe"]
    note = version_note(cfg)
    assert "mlxft 0.0.9" in note and f"mlxft {mlxft.__version__}" in note
    assert version_note({**cfg, "versions": {"mlxft": mlxft.__version__}}) is None


@pytest.mark.parametrize("text,phrase", [
    ("{oops", "is not valid JSON (line 1"),
    ("[1, 2]", "expected a JSON object"),
    ('{"run_format": "two", "recipe": {}}', "run_format 'two' is not a run format"),
    ('{"versions": {"mlxft": "0.0.1"}}', "has no recipe section"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_a_damaged_config_json_is_one_message(run, text, phrase):
    (run / "config.json").write_text(text)
    with pytest.raises(RunFormatError, match=phrase.replace("(", r"\(").replace("[", r"\[")):
        RunDir.open(run).read_config()
    res = CliRunner().invoke(main, ["generate", str(run), "-p", "hi"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit) and phrase in res.output


def test_new_runs_record_their_format(run, tmp_path):
    rd = RunDir(tmp_path / "fresh")
    rd.root.mkdir()
    rd.write_config({"recipe": {"name": "x"}})
    assert json.loads(rd.config.read_text())["run_format"] == RUN_FORMAT


def test_resuming_a_run_from_another_version_names_both(tiny_model, tiny_data, tmp_path):
    from mlxft.recipes import load_recipe
    from mlxft.training.setup import resume, train

    recipe = load_recipe("smollm2-135m", tier=8, overrides=[
        f"model.source={tiny_model}", "train.iters=4", "train.save_every=2", "train.batch_size=4",
        "train.val_every=40", "lora.num_layers=2", "lora.rank=4", "train.max_seq_length=64"])
    root = train(recipe, tiny_data, tmp_path / "runs", log=lambda *_: None).run.root
    import shutil

    shutil.rmtree(root / "checkpoints" / "step-000004")  # as if killed after step 2
    cfg = json.loads((root / "config.json").read_text())
    cfg["versions"]["mlxft"] = "0.0.9"
    (root / "config.json").write_text(json.dumps(cfg))
    lines = []
    resume(root, log=lines.append)
    assert any("written by mlxft 0.0.9" in line and f"this is mlxft {mlxft.__version__}" in line for line in lines)
