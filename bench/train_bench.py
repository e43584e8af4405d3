"""Training speed: `mlxft train` vs stock `mlx_lm.lora` (and HF PEFT on torch CPU), alternating, same base, data, LoRA.

Run: make bench   (or: .venv/bin/python bench/train_bench.py [--iters N] [--rounds R])

Same base (the bundled SmolLM2-135M, dequantized to fp32, as an mlx-lm folder both load), same
data (the default recipe's, datasets/commit-type-replay), LoRA rank/scale/targets/layers, batch size, max length, learning
rate and iterations, same BLAS (mlx_lm.lora runs through `python -c "import mlxft; ..."`, so
OpenBLAS is preloaded exactly as for mlxft). The tools alternate, each in its own subprocess of
this one, `--rounds` times; the first reporting window of each run (warm-up, compilation) is
dropped. Throughput is reported as measured and as ratios within a round, because the machine
is shared. Supervised tokens are counted with one definition for both tools: the answer's tokens
and its end-of-turn token (mlx-lm's own count adds the newline after it and one padding target
per row; it is reported too). Results go to bench/results.json with the machine description.

When torch and peft import (the optional `bench` extra), HF PEFT on PyTorch CPU runs in each round
too (bench/peft_peer.py: the same fp32 folder, LoRA, rows, masks, batch order and AdamW steps;
its memory is peak RSS growth, the mlx tools' is mx.get_peak_memory). The step's achieved FLOP/s
(matmul FLOPs of the work mlxft executes) is reported against fp32 matmul FLOP/s measured in the
same run, as `mlxft doctor` measures it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlxft.training.plan import STEP_EFFICIENCY
from mlxft.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

# mlx_lm.lora runs through peers.py's WRAPPER: stock compute, mlxft's batches (same rows per step,
# built as mlx-lm builds its own), each training batch's real tokens, mlx-lm's supervised count and
# ours (answer + <|im_end|>) recorded.
from peers import WRAPPER  # noqa: E402

RECIPE = "smollm2-135m"
WINDOW = 5  # steps per reporting window
DOCTOR_MATMUL_N = 2048  # `mlxft doctor` measures fp32 2048 x 2048 matmuls (mlxft/doctor.py collect)


def base_folder() -> Path:
    from mlxft.models.load import resolve_model

    return resolve_model("builtin:smollm2-135m-instruct", dequantize="fp32")


def machine() -> dict:
    from mlxft.doctor import chip, memory_bytes
    from mlxft import _blas
    import importlib.metadata as md

    return {
        "platform": platform.platform(), "chip": chip(), "cpu_count": os.cpu_count(),
        "memory_gb": round(memory_bytes()[0] / 2**30, 1), "device": str(mx.default_device()),
        "blas": _blas.loaded_path, "mlx": md.version("mlx"), "mlx_lm": md.version("mlx-lm"),
        "load_average_at_start": os.getloadavg(),
    }


def run_mlxft(base: Path, iters: int, work: Path, extra: list[str]) -> dict:
    runs = work / f"mlxft-{time.time_ns()}"
    cmd = [str(Path(sys.executable).parent / "mlxft"), "train", RECIPE, "--model", str(base), "--runs-dir", str(runs),
           "--set", f"train.iters={iters}", "--set", f"train.report_every={WINDOW}", "--set", "train.val_every=100000",
           "--set", "train.val_batches=1", "--set", "train.save_every=0", "--set", "train.warmup_steps=0"]
    for e in extra:
        cmd += ["--set", e]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (metrics,) = runs.glob("*/metrics.jsonl")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    w = [m for m in lines if "tokens" in m]
    first, last = w[0], w[-1]  # drop the first window (warm-up)
    sec = last["elapsed_sec"] - first["elapsed_sec"]
    return {
        "steps_timed": last["step"] - first["step"], "seconds": sec,
        "tokens_per_sec": (last["tokens"] - first["tokens"]) / sec,
        "supervised_tokens_per_sec": (last["supervised_tokens"] - first["supervised_tokens"]) / sec,
        "rows_per_sec": (last["step"] - first["step"]) * 8 / sec,
        "peak_memory_gb": max(m["peak_memory_gb"] for m in w),
        "train_loss": [m["train_loss"] for m in w],
    }


def mlx_lm_config(base: Path, iters: int, work: Path) -> Path:
    from mlxft.recipes import load_recipe

    r = load_recipe(RECIPE, tier=8)
    cfg = {
        "model": str(base), "train": True, "data": str(ROOT / r.data.path), "fine_tune_type": "lora",
        "mask_prompt": True, "num_layers": r.lora.num_layers, "batch_size": r.train.batch_size, "iters": iters,
        "val_batches": 1, "steps_per_report": WINDOW, "steps_per_eval": 100000, "save_every": 100000,
        "learning_rate": r.train.learning_rate, "max_seq_length": r.train.max_seq_length, "seed": 0,
        "grad_checkpoint": False, "adapter_path": str(work / "mlx-lm-adapters"),
        "lora_parameters": {"rank": r.lora.rank, "scale": r.lora.scale, "dropout": r.lora.dropout, "keys": list(r.lora.targets)},
    }
    path = work / "mlx_lm_lora.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def run_mlx_lm(base: Path, config: Path, work: Path) -> dict:
    from mlx_lm.utils import load_tokenizer

    eot = load_tokenizer(base).convert_tokens_to_ids("<|im_end|>")
    counts_file = work / f"counts-{time.time_ns()}.json"
    spec = work / "mlx_lm-spec.json"  # mlxft's batches, so both tools train on the same rows per step
    spec.write_text(json.dumps({"tool": "mlx_lm", "eot": int(eot), "out": str(counts_file), "memory_limit": None,
                                "order": [[int(i) for i in b] for b in mlxft_batches()[1]]}))
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(spec), "--config", str(config)],
        check=True, cwd=ROOT, capture_output=True, text=True,
    ).stdout
    rec = np.array(json.loads(counts_file.read_text())["records"])
    # rec[k] is taken when batch k+1 is fetched, i.e. after step k; step 1 (with the first
    # validation) and the last step (with the final validation) are left out, like a warm-up.
    lo, hi = WINDOW, len(rec) - 1  # steps lo+1 .. hi
    sec = rec[hi, 0] - rec[lo, 0]
    c = rec[lo:hi, 2:].sum(axis=0)  # batch k is counted in rec[k-1]
    return {
        "steps_timed": hi - lo, "seconds": float(sec), "tokens_per_sec": c[0] / sec,
        "supervised_tokens_per_sec": c[2] / sec, "mlx_lm_own_supervised_tokens_per_sec": c[1] / sec,
        "rows_per_sec": (hi - lo) * 8 / sec, "peak_memory_gb": float(rec[hi, 1]) / 1e9,
        "stdout_tail": out[-600:],
    }


@functools.lru_cache(maxsize=1)
def mlxft_batches() -> tuple[list, list]:
    """(encoded train rows, mlxft train's epoch-0 batches of the default recipe as row indices =
    train.jsonl lines); read once per bench run, for mlx_lm.lora's batches and the FLOP count."""
    from mlxft.training.plan import encoded_rows
    from mlxft.recipes import load_recipe
    from mlxft.training.batches import EpochBatches
    from mlxft.training.fast.paths import speed_paths

    r = load_recipe(RECIPE, tier=8)
    # The plan's cached encoding (its tokenizer alone, no weights): step_flops' epoch_batches reuses it.
    rows = encoded_rows(r.model.source, str(ROOT / r.data.path), r.data.system_prompt, r.train.max_seq_length)
    return rows, EpochBatches(rows, r.train, grouped=speed_paths(r).grouped_batches).order(0)


def step_flops(iters: int) -> tuple[float, float]:
    """(executed, full-row) matmul FLOPs per step, averaged over mlxft's timed steps, by the model
    `mlxft plan` uses for its speed estimate (mlxft.training.plan.step_flops): executed = the shared-prefix
    path as run (suffix rows, padding included, through all blocks; the prefix once through the
    trainable blocks; frozen prefix cached); full-row = what the plain path needs for the same rows.
    """
    from mlxft.training.plan import Batch, epoch_batches, shape_of, step_flops as batch_flops
    from mlxft.recipes import load_recipe

    r = load_recipe(RECIPE, tier=8)
    shape, nt = shape_of(r.model.source), r.lora.num_layers
    rows, order = mlxft_batches()
    timed = epoch_batches(r, ROOT / r.data.path)[0][WINDOW:iters]
    assert [b.indices for b in timed] == [tuple(int(i) for i in o) for o in order[WINDOW:iters]], "batch orders differ"
    executed = [batch_flops(shape, nt, r.lora, b) for b in timed]
    full = [batch_flops(shape, nt, r.lora, Batch(b.rows, max(len(rows[i].ids) for i in b.indices) - 1, 0, b.supervised))
            for b in timed]
    return float(np.mean(executed)), float(np.mean(full))


def peft_unavailable() -> str | None:
    """Why the HF PEFT peer cannot run here (None when torch, peft and transformers import)."""
    import importlib.util

    missing = [m for m in ("torch", "peft", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (install the bench extra: pip install -e '.[bench]')"
    return None


def run_peft(base: Path, iters: int, work: Path) -> dict:
    """HF PEFT LoRA on torch CPU (bench/peft_peer.py) in its own process: the second peer.

    Same base folder, rows, masks, batch order, LoRA and optimizer settings as mlxft; timed the
    same way (first window dropped). Its peak_memory_gb is peak RSS growth of that process, not
    mlx's allocator peak: the result carries the definition.
    """
    out = work / f"peft-{time.time_ns()}.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peft_peer.py"), "--model", str(base), "--iters", str(iters),
         "--window", str(WINDOW), "--out", str(out), "--set", "train.warmup_steps=0"],  # as run_mlxft sets it
        cwd=ROOT, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"bench/peft_peer.py exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args()
    from mlxft.doctor import matmul_gflops

    base = base_folder()
    work = Path(tempfile.mkdtemp(prefix="mlxft-bench-"))
    cfg = mlx_lm_config(base, args.iters, work)
    rounds, gflops = [], [matmul_gflops(DOCTOR_MATMUL_N)]
    peft_reason = peft_unavailable()  # HF PEFT on torch CPU: the second peer, when the bench extra is installed
    for i in range(args.rounds):
        a = run_mlxft(base, args.iters, work, [])
        print(f"round {i + 1} mlxft:        {a['supervised_tokens_per_sec']:.2f} supervised tok/s, "
              f"{a['tokens_per_sec']:.0f} tok/s, peak {a['peak_memory_gb']:.2f} GB", flush=True)
        b = run_mlx_lm(base, cfg, work)
        print(f"round {i + 1} mlx_lm.lora:  {b['supervised_tokens_per_sec']:.2f} supervised tok/s, "
              f"{b['tokens_per_sec']:.0f} tok/s, peak {b['peak_memory_gb']:.2f} GB", flush=True)
        c = None
        if peft_reason is None:
            try:
                c = run_peft(base, args.iters, work)
                print(f"round {i + 1} HF PEFT:      {c['supervised_tokens_per_sec']:.2f} supervised tok/s, "
                      f"{c['tokens_per_sec']:.0f} tok/s, peak RSS growth {c['peak_memory_gb']:.2f} GB", flush=True)
            except (RuntimeError, OSError, ValueError) as e:
                peft_reason = f"the peer failed in round {i + 1}: {e}"
                print(f"round {i + 1} HF PEFT:      not measured: {peft_reason}", flush=True)
        gflops.append(matmul_gflops(DOCTOR_MATMUL_N))
        rounds.append({"mlxft": a, "mlx_lm_lora": b,
                       "ratio_supervised": a["supervised_tokens_per_sec"] / b["supervised_tokens_per_sec"],
                       "ratio_rows": a["rows_per_sec"] / b["rows_per_sec"],
                       "ratio_total_tokens": a["tokens_per_sec"] / b["tokens_per_sec"],
                       "memory_ratio": a["peak_memory_gb"] / b["peak_memory_gb"]})
        if c is not None:
            rounds[-1].update({"hf_peft": c,
                               "ratio_supervised_vs_peft": a["supervised_tokens_per_sec"] / c["supervised_tokens_per_sec"],
                               "ratio_total_tokens_vs_peft": a["tokens_per_sec"] / c["tokens_per_sec"],
                               "memory_ratio_vs_peft_rss_growth": a["peak_memory_gb"] / c["peak_memory_gb"]})
    peft_rounds = [r for r in rounds if "hf_peft" in r]
    executed, full = step_flops(args.iters)
    matmul = statistics.median(gflops) * 1e9
    step_sec = statistics.median(r["mlxft"]["seconds"] / r["mlxft"]["steps_timed"] for r in rounds)
    result = {
        "what": "mlxft train vs stock mlx_lm.lora (and HF PEFT on torch CPU where the bench extra is installed), "
                "default recipe smollm2-135m (fp32 base, LoRA r8 on 7 targets x 16 layers, "
                f"batch 8, max len 256), {args.iters} iterations each, {args.rounds} alternating rounds, first {WINDOW} steps dropped",
        "machine": machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rounds": rounds,
        "median_ratio_supervised_tokens_per_sec": statistics.median(r["ratio_supervised"] for r in rounds),
        "median_ratio_total_tokens_per_sec": statistics.median(r["ratio_total_tokens"] for r in rounds),
        "median_memory_ratio": statistics.median(r["memory_ratio"] for r in rounds),
        "matmul_gflops_fp32_doctor": gflops,  # the same n x n matmul `mlxft doctor` measures
        "step_flops_executed": executed,
        "step_flops_full_rows": full,
        "achieved_fraction_of_matmul": executed / step_sec / matmul,
        "effective_fraction_of_matmul_full_row_flops": full / step_sec / matmul,
        # HF PEFT on torch CPU (bench/peft_peer.py), from the rounds where it ran; its memory is peak RSS
        # growth of its process (torch has no CPU allocator peak), the mlx figures are mx.get_peak_memory().
        "hf_peft": {
            "rounds_measured": len(peft_rounds),
            "median_ratio_supervised_tokens_per_sec": statistics.median(r["ratio_supervised_vs_peft"] for r in peft_rounds),
            "median_ratio_total_tokens_per_sec": statistics.median(r["ratio_total_tokens_vs_peft"] for r in peft_rounds),
            "memory_definition": peft_rounds[0]["hf_peft"]["peak_memory_definition"],
            **({"note": f"not measured in every round: {peft_reason}"} if peft_reason else {}),
        } if peft_rounds else f"HF PEFT not measured: {peft_reason}",
        "median_ratio_supervised_vs_peft": (
            statistics.median(r["ratio_supervised_vs_peft"] for r in peft_rounds) if peft_rounds else None),
    }
    write_atomic(Path(args.out), json.dumps(result, indent=1))
    print(f"\nsupervised tokens/s ratio mlxft / mlx_lm.lora: {result['median_ratio_supervised_tokens_per_sec']:.2f}x "
          f"(target >= 2.0x); total tokens/s ratio {result['median_ratio_total_tokens_per_sec']:.2f}x; "
          f"peak memory ratio {result['median_memory_ratio']:.2f} (target <= 1.0)")
    if peft_rounds:
        print(f"supervised tokens/s ratio mlxft / HF PEFT: {result['median_ratio_supervised_vs_peft']:.2f}x (target >= 4x); "
              f"total tokens/s ratio {result['hf_peft']['median_ratio_total_tokens_per_sec']:.2f}x")
    else:
        print(f"HF PEFT not measured: {peft_reason}")
    print(f"training step: {executed / step_sec / 1e9:.1f} GFLOP/s executed = {result['achieved_fraction_of_matmul']:.0%} of "
          f"measured matmul {matmul / 1e9:.0f} GFLOP/s (target >= 40%; `mlxft plan` assumes {STEP_EFFICIENCY:.0%}); "
          f"full-row equivalent {result['effective_fraction_of_matmul_full_row_flops']:.0%}")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
