"""One-command GPU check for a CUDA machine: `make gpu-check` (or: python bench/gpu_check.py [--dry-run]).

Steps, each timed and recorded in one JSON (bench/gpu_check.json), in under 8 minutes on one GPU:

1. environment: nvidia-smi sees a GPU; a virtual environment (.venv-gpu) with mlxft, its test
   tools and mlx's CUDA build (`mlx[cuda]`, the CPU backend package removed so CUDA's libmlx is the
   one loaded); from PyPI, or with `--wheels DIR` from local wheels (machines without a network);
2. mlx on the GPU: the default device is the GPU, `mx.cuda.is_available()`, a matmul runs;
3. the backend-sensitive tests (BACKEND_TESTS: the loss, the training forwards and their
   numerics, checkpointing, the memory plan, sampling, fuse) on the GPU, fast (not slow) ones;
4. a QLoRA run of the default recipe: `mlxft train smollm2-135m --set quantize=4` (4-bit base);
5. the benchmarks: bench/train_bench.py (mlxft vs mlx_lm.lora, default workload, 1 round) and
   bench/memory_bench.py's peaks (1024/2048/4096 tokens, with and without checkpointing).

A step that fails is recorded (exit code, last lines) and the next runs; a step that would start
after the deadline is recorded as skipped. `--dry-run` checks everything up to starting: the
files and commands of every step, that the recipe and bench scripts load, the tools it needs
(python, pip, nvidia-smi: where absent the report says the real run would stop there), and
writes the plan with `"dry_run": true`; it installs and runs nothing.
"""

from __future__ import annotations

import argparse
import json
import py_compile
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-gpu"
BUDGET_S = 8 * 60
BACKEND_TESTS = [
    "tests/training/test_loss.py", "tests/training/test_train.py", "tests/training/test_plan.py",
    "tests/training/fast", "tests/integration/test_speed_numerics.py", "tests/inference/test_sampling.py",
    "tests/models/test_fuse.py",
]
BENCH_SCRIPTS = ["bench/train_bench.py", "bench/memory_bench.py"]
MLX_CUDA = "mlx[cuda]>=0.32,<0.33"
GPU_PROBE = ("import mlx.core as mx; assert mx.default_device().type == mx.DeviceType.gpu, mx.default_device(); "
             "assert mx.cuda.is_available(); a = mx.random.normal((2048, 2048)); mx.eval(a @ a); "
             "print(mx.default_device(), mx.device_info())")


def venv_python() -> Path:
    return VENV / "bin" / "python"


def install_commands(wheels: str | None) -> list[list[str]]:
    py = str(venv_python())
    source = ["--no-index", "--find-links", wheels] if wheels else []
    return [
        [sys.executable, "-m", "venv", str(VENV)],
        [py, "-m", "pip", "install", "-q", *source, "-e", f"{ROOT}[test]"],
        [py, "-m", "pip", "uninstall", "-y", "mlx-cpu"],  # CUDA's libmlx must be the one loaded
        [py, "-m", "pip", "install", "-q", *source, MLX_CUDA],
    ]


def steps(wheels: str | None, iters: int) -> list[dict]:
    """Every step: name, commands, and what it needs on disk."""
    py = str(venv_python())
    return [
        {"name": "gpu visible", "commands": [["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"]]},
        {"name": "install mlx[cuda]", "commands": install_commands(wheels), "needs": ["pyproject.toml"]},
        {"name": "mlx on the gpu", "commands": [[py, "-c", GPU_PROBE]]},
        {"name": "backend-sensitive tests", "commands": [[py, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                                                          *BACKEND_TESTS]], "needs": BACKEND_TESTS},
        {"name": "qlora default recipe", "commands": [[str(VENV / "bin" / "mlxft"), "train", "smollm2-135m", "--set", "quantize=4",
                                                       "--set", f"train.iters={iters}", "--runs-dir", str(ROOT / "runs-gpu-check")]],
         "needs": ["recipes/smollm2-135m.yaml"]},
        {"name": "train bench", "commands": [[py, "bench/train_bench.py", "--rounds", "1", "--out", "bench/gpu_train_results.json"]],
         "needs": ["bench/train_bench.py"]},
        {"name": "memory bench", "commands": [[py, "bench/memory_bench.py", "--sections", "peaks",
                                               "--out", "bench/gpu_memory_results.json"]], "needs": ["bench/memory_bench.py"]},
    ]


def dry_run(plan: list[dict]) -> dict:
    """Everything up to starting: files present, scripts compile, the recipe loads, tools found."""
    problems, notes = [], []
    for step in plan:
        for need in step.get("needs", []):
            if not (ROOT / need).exists():
                problems.append(f"{step['name']}: {need} is missing")
    for script in BENCH_SCRIPTS + ["bench/peers.py", "bench/bench_data.py"]:
        try:
            py_compile.compile(str(ROOT / script), doraise=True)
        except py_compile.PyCompileError as error:
            problems.append(f"{script} does not compile: {error.msg}")
    try:
        sys.path.insert(0, str(ROOT))
        from mlxft.recipes import load_recipe  # lazy: only the dry run needs mlxft in this (outer) python
    except ImportError as error:
        notes.append(f"mlxft is not importable by this python ({error}); the real run installs it into .venv-gpu")
        load_recipe = None
    try:
        recipe = load_recipe("smollm2-135m", overrides=["quantize=4"]) if load_recipe else None
        if recipe is not None and recipe.quantize != 4:
            problems.append("the default recipe does not take quantize=4")
    except Exception as error:  # a recipe that fails to load fails the dry run with its message
        problems.append(f"recipes/smollm2-135m.yaml with quantize=4: {error}")
    if not shutil.which("nvidia-smi"):
        notes.append("no nvidia-smi here: the real run would stop at 'gpu visible'")
    if shutil.which("pip") is None and subprocess.run([sys.executable, "-m", "pip", "--version"],
                                                      capture_output=True).returncode != 0:
        problems.append("pip is not available to build .venv-gpu")
    return {"problems": problems, "notes": notes}


def run_step(step: dict, deadline: float) -> dict:
    out = {"name": step["name"], "commands": [" ".join(c) for c in step["commands"]]}
    tic = time.monotonic()
    for command in step["commands"]:
        left = deadline - time.monotonic()
        if left <= 0:
            out.update(status="skipped", reason="the 8-minute budget ran out")
            break
        try:
            proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=left)
        except (OSError, subprocess.TimeoutExpired) as error:
            out.update(status="failed", error=str(error))
            break
        if proc.returncode != 0:
            out.update(status="failed", exit_code=proc.returncode, tail=(proc.stdout + proc.stderr)[-2000:])
            break
        out["tail"] = (proc.stdout + proc.stderr)[-1200:]
    out.setdefault("status", "passed")
    out["seconds"] = round(time.monotonic() - tic, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="check everything up to starting; install and run nothing")
    ap.add_argument("--wheels", help="install from local wheels in this folder (no network)")
    ap.add_argument("--iters", type=int, default=120, help="steps of the QLoRA run (the default recipe's 120)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "gpu_check.json"))
    args = ap.parse_args(argv)
    plan = steps(args.wheels, args.iters)
    report = {"what": "mlxft GPU check", "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "budget_s": BUDGET_S,
              "dry_run": args.dry_run, "steps": [{"name": s["name"], "commands": [" ".join(c) for c in s["commands"]]} for s in plan]}
    if args.dry_run:
        report.update(dry_run(plan))
        ok = not report["problems"]
    else:
        deadline = time.monotonic() + BUDGET_S
        report["steps"] = []
        for step in plan:
            result = run_step(step, deadline)
            report["steps"].append(result)
            print(f"{result['name']}: {result['status']} ({result['seconds']} s)", flush=True)
            if step["name"] in ("gpu visible", "install mlx[cuda]", "mlx on the gpu") and result["status"] != "passed":
                break  # nothing after these can run on the GPU
        ok = all(s["status"] == "passed" for s in report["steps"]) and len(report["steps"]) == len(plan)
    report["ok"] = ok
    Path(args.out).write_text(json.dumps(report, indent=1))
    for line in report.get("problems", []) + report.get("notes", []):
        print(line)
    print(f"{'dry run' if args.dry_run else 'gpu check'}: {'ok' if ok else 'NOT ok'}; results: {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
