"""`make gpu-check` (bench/gpu_check.py) up to starting: its dry run plans every step, checks the files,
scripts and recipe they need, and installs and runs nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_dry_run_plans_every_step_and_starts_nothing(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["ok"] is True and report["problems"] == []
    names = [s["name"] for s in report["steps"]]
    assert names == ["gpu visible", "install mlx[cuda]", "mlx on the gpu", "backend-sensitive tests",
                     "qlora default recipe", "train bench", "memory bench"]
    commands = " ".join(c for s in report["steps"] for c in s["commands"])
    assert "mlx[cuda]" in commands and "quantize=4" in commands and "pytest" in commands
    assert not gpu_check.VENV.exists() or gpu_check.VENV.stat().st_mtime < out.stat().st_mtime  # nothing built
    assert report["budget_s"] <= 8 * 60


def test_dry_run_reports_what_is_missing(monkeypatch):
    monkeypatch.setattr(gpu_check, "BACKEND_TESTS", gpu_check.BACKEND_TESTS + ["tests/no_such_test.py"])
    found = gpu_check.dry_run(gpu_check.steps(None, 120))
    assert any("tests/no_such_test.py is missing" in p for p in found["problems"])


def test_local_wheels_install_without_the_network():
    commands = [" ".join(c) for c in gpu_check.install_commands("/wheels")]
    assert all("--no-index --find-links /wheels" in c for c in commands if " install " in c and "uninstall" not in c)
    assert any("uninstall -y mlx-cpu" in c for c in commands)
