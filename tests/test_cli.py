"""The command line: user mistakes give one clear message and a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from mlxft.cli import main


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_unknown_recipe_is_one_clear_line():
    r = run("train", "no-such-recipe")
    assert r.exit_code == 1
    assert "no-such-recipe" in r.output and "Traceback" not in r.output


def test_bad_override_names_the_key():
    r = run("train", "smollm2-135m", "--set", "train.itres=5")
    assert r.exit_code == 1 and "train.itres" in r.output


def test_missing_model_is_reported(tmp_path):
    r = run("generate", str(tmp_path / "nope"), "-p", "hi")
    assert r.exit_code == 1 and "nope" in r.output and "Traceback" not in r.output


def test_missing_data_folder_is_reported(tiny_model, tmp_path):
    r = run("train", "smollm2-135m", "--set", f"model.source={tiny_model}", "--data", str(tmp_path / "missing"))
    assert r.exit_code == 1 and "missing" in r.output


def test_not_a_gguf_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    out = tmp_path / "out"
    r = run("import-gguf", str(bad), str(out))
    assert r.exit_code == 1 and "bad.gguf" in r.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_train_generate_chat_end_to_end(tiny_model, tiny_data, tmp_path):
    r = run("train", "smollm2-135m", "--data", str(tiny_data), "--runs-dir", str(tmp_path),
            "--model", str(tiny_model), "--set", "train.iters=4", "--set", "train.batch_size=4",
            "--set", "lora.num_layers=2", "--set", "train.val_every=2",
            "--set", "eval.suites=[]", "--compare")  # no suites: --compare scores the data's test split
    assert r.exit_code == 0, r.output
    assert "test: 12 rows" in r.output and "exact_match" in r.output and "gates: all passed" in r.output
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "adapters" / "adapters.safetensors").is_file()
    g = run("generate", str(run_dir), "-p", "alpha x", "--max-tokens", "3")
    assert g.exit_code == 0
    c = CliRunner().invoke(main, ["chat", str(run_dir), "--max-tokens", "2"], input="hello\n/reset\nhi\n/exit\n")
    assert c.exit_code == 0 and c.output.count(">>> ") == 4


def test_doctor_reports_fast_blas():
    r = run("doctor", "--json")
    assert r.exit_code == 0
    info = json.loads(r.output)
    assert info["memory_tier"] in (8, 16, 24, 32, 48, 64, 96, 128)
    if sys.platform == "linux" and os.path.exists("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"):
        assert "openblas" in info["blas"].lower() and "REFERENCE" not in info["blas"]
        assert info["matmul_gflops_fp32"] > 20


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "mlxft.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "mlxft" in out.stdout


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = run("generate", "nobody-here/no-such-model", "-p", "hi")
    assert r.exit_code == 1
    assert "nobody-here/no-such-model" in r.output and "Offline?" in r.output
