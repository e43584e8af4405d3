"""Training memory: peak memory of `mlxft train` vs stock `mlx_lm.lora`, with and without checkpointing.

Run: make bench   (or: .venv/bin/python bench/memory_bench.py [--sections peaks,limit,llama1b])

Sections (the same rows for both tools: long GSM8K rows, bench/bench_data.py, cut at the length;
batch 1; the bundled SmolLM2-135M in fp32; LoRA rank 8 on the 7 linear layers of all 30 blocks):

- peaks: at max length 1024, 2048 and 4096, each tool with and without gradient checkpointing
  (mlxft: train.grad_checkpoint, by blocks; mlx_lm.lora: --grad-checkpoint), alternating; peak =
  mx.get_peak_memory over the run. A run whose peak, extrapolated from the shorter lengths, would not fit in
  this machine's available memory is not started (said in the results). `mlxft plan`'s prediction
  is printed beside every mlxft measurement.
- cost: checkpointing's step cost, measured in one process at 2048 tokens: a plain and a
  checkpointed step on the same row in turn, 3 rounds (single steps in separate runs vary too much
  on a shared machine).
- limit: the longest sequence each tool trains (checkpointing on, one step) under one fixed memory
  limit (`mx.set_memory_limit(--limit-gb)`, set in each tool's process): lengths up in steps of
  x1.25 until the peak exceeds the limit, from the longest the peaks section saw fit (else 512).
- llama1b: a random-weight model with Llama-3.2-1B's published shape, written as an fp32 mlx-lm
  folder, trained by `mlxft train` for 3 steps at two settings: plan vs measured.

Results go to bench/memory_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx)

from mlxft.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_data import problems_for, write_long_rows  # noqa: E402
from peers import end_of_turn, mlxft_order, run_mlx_tool, run_mlxft, tool_config  # noqa: E402
from train_bench import base_folder, machine  # noqa: E402

RECIPE = "smollm2-135m"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                rms_norm_eps=1e-5, max_position_embeddings=131072)  # meta-llama/Llama-3.2-1B config.json (rope scaling aside)


def sets(length: int, checkpoint: bool, iters: int, layers: int = -1) -> list[str]:
    return [f"train.max_seq_length={length}", "train.batch_size=1", f"lora.num_layers={layers}", f"train.iters={iters}",
            f"train.grad_checkpoint={'true' if checkpoint else 'false'}", "data.system_prompt=null"]


def predicted_gb(model: Path, data: Path, overrides: list[str]) -> float:
    """`mlxft plan`'s predicted peak for these settings (no speed measurement)."""
    from mlxft.recipes import load_recipe
    from mlxft.training.plan import plan_recipe

    recipe = load_recipe(RECIPE, tier=24, overrides=[f"model.source={model}", *overrides])
    return plan_recipe(recipe, data, measure_speed=False).peak_bytes / 1e9


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("inf")


class Tools:
    """Runs mlxft and mlx_lm.lora on the same long rows, with the same LoRA."""

    def __init__(self, base: Path, work: Path):
        self.base, self.work, self.eot = base, work, end_of_turn(base)

    def data(self, length: int) -> Path:
        """Rows that reach `length` tokens (cut there by both tools); the answers are in every row."""
        out = self.work / f"rows-{length}"
        return out if out.exists() else write_long_rows(out, problems=problems_for(length), n_rows=4)

    def train_mlxft(self, length: int, checkpoint: bool, iters: int, limit: int | None = None) -> dict:
        overrides = sets(length, checkpoint, iters)
        data = self.data(length)
        out = run_mlxft(RECIPE, self.base, data, self.work, overrides, skip=1 if iters > 1 else 0, memory_limit=limit)
        out["predicted_peak_gb"] = predicted_gb(self.base, data, overrides)
        return out

    def train_mlx_lm(self, length: int, checkpoint: bool, iters: int, limit: int | None = None) -> dict:
        from mlxft.recipes import load_recipe
        from mlxft.training.plan import encoded_rows

        recipe = load_recipe(RECIPE, tier=24, overrides=sets(length, checkpoint, iters))
        data = self.data(length)
        order = mlxft_order(recipe, encoded_rows(recipe.model.source, str(data), None, length))
        config = tool_config("mlx_lm", self.base, data, self.work, iters=iters, batch_size=1, max_seq_length=length,
                             num_layers=-1, learning_rate=recipe.train.learning_rate, grad_checkpoint=checkpoint,
                             lora={"rank": recipe.lora.rank, "scale": recipe.lora.scale, "dropout": 0.0,
                                   "keys": list(recipe.lora.targets)})
        return run_mlx_tool("mlx_lm", config, order, self.eot, self.work, skip=0, memory_limit=limit)


def extrapolate(points: dict[int, float], length: int) -> float | None:
    """A quadratic through the measured (length, GB) points (attention grows with the square), or None."""
    if len(points) < 2:
        return None
    import numpy as np

    xs, ys = zip(*sorted(points.items()))
    return float(np.polyval(np.polyfit(xs, ys, min(2, len(xs) - 1)), length))


def peaks(tools: Tools, lengths: list[int]) -> list[dict]:
    out, seen = [], {}
    for length in lengths:
        row = {"length": length, "load_average": os.getloadavg()}
        for checkpoint in (False, True):
            key = "checkpointed" if checkpoint else "plain"
            row[f"mlxft_{key}"] = tools.train_mlxft(length, checkpoint, iters=2)
            m = row[f"mlxft_{key}"]
            print(f"{length} mlxft {key}: peak {m['peak_memory_gb']:.2f} GB (plan {m['predicted_peak_gb']:.2f}), "
                  f"{m['seconds_per_step']:.1f} s/step", flush=True)
            guess = extrapolate(seen.get(key, {}), length)
            if guess is not None and guess > 0.7 * available_gb():
                row[f"mlx_lm_{key}"] = {"not_run": f"extrapolated peak {guess:.1f} GB > 70% of the {available_gb():.1f} GB available"}
                print(f"{length} mlx_lm.lora {key}: not run ({row[f'mlx_lm_{key}']['not_run']})", flush=True)
                continue
            row[f"mlx_lm_{key}"] = b = tools.train_mlx_lm(length, checkpoint, iters=1)
            seen.setdefault(key, {})[length] = b["peak_memory_gb"]
            print(f"{length} mlx_lm.lora {key}: peak {b['peak_memory_gb']:.2f} GB", flush=True)
        a, b = row["mlxft_plain"], row["mlxft_checkpointed"]
        row["single_run_step_cost"] = b["seconds_per_step"] / a["seconds_per_step"]  # noisy: see the cost section
        if "peak_memory_gb" in row["mlx_lm_checkpointed"]:
            row["checkpointed_memory_ratio"] = b["peak_memory_gb"] / row["mlx_lm_checkpointed"]["peak_memory_gb"]
        out.append(row)
    return out


def longest_under(run, limit_gb: float, start: int = 512, stop: int = 16384) -> dict:
    """The longest length (x1.25 steps from `start`) whose one-step peak stays under the limit."""
    tried, best, length = [], None, start
    while length <= stop:
        r = run(length)
        tried.append({"length": length, "peak_memory_gb": r["peak_memory_gb"]})
        print(f"  {length}: peak {r['peak_memory_gb']:.2f} GB", flush=True)
        if r["peak_memory_gb"] > limit_gb:
            break
        best, length = length, int(length * 1.25) // 64 * 64
    return {"longest": best, "tried": tried}


def limit_section(tools: Tools, limit_gb: float, start: int, measured: list[dict] | None = None) -> dict:
    """Each tool's longest length under the limit; a tool's search starts at the longest length the
    peaks section saw it fit under the limit (else at `start`), to spend no steps below it."""
    limit = int(limit_gb * 1e9)

    def first(key: str) -> int:
        fits = [r["length"] for r in measured or [] if r.get(key, {}).get("peak_memory_gb", limit_gb + 1) <= limit_gb]
        return max(fits, default=start)

    print(f"longest sequence under mx.set_memory_limit({limit_gb} GB), checkpointing on:", flush=True)
    print(" mlx_lm.lora:", flush=True)
    b = longest_under(lambda n: tools.train_mlx_lm(n, True, iters=1, limit=limit), limit_gb, first("mlx_lm_checkpointed"))
    print(" mlxft:", flush=True)
    a = longest_under(lambda n: tools.train_mlxft(n, True, iters=1, limit=limit), limit_gb, first("mlxft_checkpointed"))
    return {"limit_gb": limit_gb, "mlxft": a, "mlx_lm_lora": b,
            "ratio": (a["longest"] or 0) / b["longest"] if b["longest"] else None}


def cost_section(tools: Tools, length: int, rounds: int) -> dict:
    """Checkpointing's step cost, in one process: the same row, a plain step and a checkpointed step
    in turn (`rounds` each, after one warm-up of each), the same forwards `mlxft train` builds."""
    import statistics

    import mlx.core as mx

    from mlxft.data.encode import encode_rows, load_splits, load_tokenizer
    from mlxft.models.load import load_base
    from mlxft.recipes import load_recipe
    from mlxft.training.adapters import attach_adapters
    from mlxft.training.fast.paths import speed_paths
    from mlxft.training.sft import choose_forward

    data = tools.data(length)
    recipes = {k: load_recipe(RECIPE, tier=24, overrides=[f"model.source={tools.base}", *sets(length, k == "checkpointed", 1)])
               for k in ("plain", "checkpointed")}
    tok, _ = load_tokenizer(str(tools.base))
    row = encode_rows(tok, load_splits(data, ("train",))["train"][:1], None, length)
    model = load_base(str(tools.base), tokenizer=tok).model
    attach_adapters(model, recipes["plain"])
    model.train()
    runs = {}
    for key, recipe in recipes.items():
        paths = speed_paths(recipe, model)
        runs[key] = (paths, choose_forward(model, recipe, paths))
    times = {k: [] for k in runs}
    for i in range(rounds + 1):
        for key, (paths, forward) in runs.items():
            with paths.applied(model):
                tic = time.perf_counter()
                mx.eval(forward.loss_and_grad(model, row))
                if i:  # the first of each is a warm-up
                    times[key].append(time.perf_counter() - tic)
        if i:
            print(f"  round {i}: plain {times['plain'][-1]:.1f} s, checkpointed {times['checkpointed'][-1]:.1f} s "
                  f"({times['checkpointed'][-1] / times['plain'][-1]:.2f}x)", flush=True)
    ratios = [b / a for a, b in zip(times["plain"], times["checkpointed"])]
    return {"length": length, "seconds": times, "ratios": ratios, "median_ratio": statistics.median(ratios),
            "load_average": os.getloadavg()}


def write_llama_1b(out: Path, tokenizer_from: Path) -> Path:
    """A random-weight fp32 model with Llama-3.2-1B's shape, SmolLM2's tokenizer (ids < its vocabulary)."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "torch_dtype": "float32", **LLAMA_1B}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = {k: (v * 0.02 if v.ndim == 2 else v) for k, v in tree_flatten(model.parameters())}  # tame activations
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, out / name)
    return out


def llama_1b_section(tools: Tools) -> list[dict]:
    model = write_llama_1b(tools.work / "llama-1b-shape", tools.base)
    out = []
    for length, checkpoint in ((512, False), (1024, True)):
        overrides = sets(length, checkpoint, iters=3, layers=16)
        data = tools.data(length)
        r = run_mlxft(RECIPE, model, data, tools.work, overrides, skip=1)
        r["predicted_peak_gb"] = predicted_gb(model, data, overrides)
        r.update({"length": length, "grad_checkpoint": checkpoint})
        print(f"Llama-3.2-1B shape, {length} tokens, checkpointing {checkpoint}: peak {r['peak_memory_gb']:.2f} GB, "
              f"plan {r['predicted_peak_gb']:.2f} GB ({r['predicted_peak_gb'] / r['peak_memory_gb'] - 1:+.0%})", flush=True)
        out.append(r)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="peaks,cost,limit,llama1b")
    ap.add_argument("--cost-length", type=int, default=2048)
    ap.add_argument("--cost-rounds", type=int, default=3)
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--limit-gb", type=float, default=1.5)
    ap.add_argument("--limit-start", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "memory_results.json"))
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    tools = Tools(base_folder(), Path(tempfile.mkdtemp(prefix="mlxft-memory-")))
    report = {"what": __doc__.splitlines()[0], "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if "peaks" in sections:
        report["peaks"] = peaks(tools, [int(n) for n in args.lengths.split(",")])
    if "cost" in sections:
        print(f"checkpointing's step cost at {args.cost_length} tokens (same process, steps in turn):", flush=True)
        report["checkpoint_cost"] = cost_section(tools, args.cost_length, args.cost_rounds)
    if "limit" in sections:
        report["limit"] = limit_section(tools, args.limit_gb, args.limit_start, report.get("peaks"))
    if "llama1b" in sections:
        report["llama_1b_shape"] = llama_1b_section(tools)
    write_atomic(Path(args.out), json.dumps(report, indent=1))
    for row in report.get("peaks", []):
        if "checkpointed_memory_ratio" in row:
            print(f"{row['length']}: checkpointed peak mlxft / mlx_lm.lora {row['checkpointed_memory_ratio']:.2f}x "
                  f"(target <= 0.4x at 4096)")
    if report.get("checkpoint_cost"):
        c = report["checkpoint_cost"]
        print(f"checkpointing's step cost at {c['length']} tokens: {c['median_ratio']:.2f}x the plain step (target <= 1.4x; "
              f"rounds {', '.join(f'{r:.2f}' for r in c['ratios'])})")
    if report.get("limit"):
        lim = report["limit"]
        print(f"longest under {lim['limit_gb']} GB: mlxft {lim['mlxft']['longest']}, mlx_lm.lora {lim['mlx_lm_lora']['longest']}"
              + (f" = {lim['ratio']:.2f}x (target >= 2x)" if lim["ratio"] else ""))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
