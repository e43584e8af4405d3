"""Long-context training speed: `mlxft train` vs stock `mlx_lm.lora` at 2048 and 4096 tokens, alternating.

Run: make bench   (or: .venv/bin/python bench/long_bench.py [--lengths 2048,4096] [--rounds R])

What a new user tries at long context: rows of 12 GSM8K problems (~2,000 tokens; 24 at 4096;
bench/bench_data.py), batch 1, LoRA rank 8 on the 7 linear layers of the last 16 blocks, the
bundled SmolLM2-135M in fp32, the same OpenBLAS, the same rows per step (mlxft's order). At the
lengths in `--checkpoint` both tools train with gradient checkpointing (stock mlx_lm.lora without
it needs ~4x its 2048-token activations at 4096, more than this 24 GB box can give while shared).
Each run trains `--iters` steps; the first step (warm-up) and, for mlx_lm.lora, the step carrying
the final validation are not timed. Then an in-process ablation at 2048 tokens (ABLATION: the
chunked attention, the allocator setting, the fused kernels, each switched off in turn). Reported per length and round: seconds per step, supervised
and total tokens/s, peak memory (mx.get_peak_memory) and the ratios within the round. Results go
to bench/long_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx)

from mlxft.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_data import write_long_rows  # noqa: E402
from peers import end_of_turn, mlxft_order, run_mlx_tool, run_mlxft, tool_config  # noqa: E402
from train_bench import base_folder, machine  # noqa: E402

RECIPE = "smollm2-135m"
LORA_LAYERS = 16
PROBLEMS_PER_2048 = 12


def settings(length: int, iters: int, checkpoint: bool) -> list[str]:
    return [f"train.max_seq_length={length}", "train.batch_size=1", f"lora.num_layers={LORA_LAYERS}",
            f"train.iters={iters}", f"train.grad_checkpoint={'true' if checkpoint else 'false'}"]


def one_length(base: Path, work: Path, length: int, iters: int, rounds: int, checkpoint: bool) -> dict:
    from mlxft.recipes import load_recipe
    from mlxft.training.plan import encoded_rows

    data = write_long_rows(work / f"rows-{length}", PROBLEMS_PER_2048 * length // 2048, n_rows=iters + 2)
    recipe = load_recipe(RECIPE, tier=24, overrides=settings(length, iters, checkpoint))
    rows = encoded_rows(recipe.model.source, str(data), None, length)
    order = mlxft_order(recipe, rows)
    config = tool_config("mlx_lm", base, data, work, iters=iters + 1, batch_size=1, max_seq_length=length,
                         num_layers=LORA_LAYERS, learning_rate=recipe.train.learning_rate, grad_checkpoint=checkpoint,
                         lora={"rank": recipe.lora.rank, "scale": recipe.lora.scale, "dropout": 0.0,
                               "keys": list(recipe.lora.targets)})
    eot = end_of_turn(base)
    out = []
    for i in range(rounds):
        a = run_mlxft(RECIPE, base, data, work, settings(length, iters, checkpoint) + ["data.system_prompt=null"], skip=1)
        print(f"{length} round {i + 1} mlxft:       {a['seconds_per_step']:.1f} s/step, {a['supervised_tokens_per_sec']:.1f} "
              f"supervised tok/s, {a['tokens_per_sec']:.0f} tok/s, peak {a['peak_memory_gb']:.2f} GB", flush=True)
        b = run_mlx_tool("mlx_lm", config, order, eot, work, skip=1)
        print(f"{length} round {i + 1} mlx_lm.lora: {b['seconds_per_step']:.1f} s/step, {b['supervised_tokens_per_sec']:.1f} "
              f"supervised tok/s, {b['tokens_per_sec']:.0f} tok/s, peak {b['peak_memory_gb']:.2f} GB", flush=True)
        out.append({"mlxft": a, "mlx_lm_lora": b, "ratio_supervised": a["supervised_tokens_per_sec"] / b["supervised_tokens_per_sec"],
                    "ratio_total_tokens": a["tokens_per_sec"] / b["tokens_per_sec"],
                    "memory_ratio": a["peak_memory_gb"] / b["peak_memory_gb"], "load_average": os.getloadavg()})
    return {"length": length, "grad_checkpoint_both": checkpoint, "rounds": out,
            "median_ratio_supervised": statistics.median(r["ratio_supervised"] for r in out),
            "median_ratio_total_tokens": statistics.median(r["ratio_total_tokens"] for r in out),
            "median_memory_ratio": statistics.median(r["memory_ratio"] for r in out)}


# In-process ablation at long context: which idea gives what (a recipe override, or "one piece":
# the attention's chunked path switched off by raising its threshold).
ABLATION = {"mlxft": [], "attention in one piece": "one piece", "freed memory returned": ["train.keep_freed_memory=false"],
            "mlx's own kernels": ["train.fast_silu=false"]}


def ablation(base: Path, work: Path, length: int, rounds: int) -> dict:
    """One training step per variant per round on the same row (16 LoRA blocks, no checkpointing),
    variants in turn, in one process; ratios to "mlxft" within each round."""
    import mlx.core as mx

    from mlxft.data.encode import encode_rows, load_splits, load_tokenizer
    from mlxft.models.load import load_base
    from mlxft.recipes import load_recipe
    from mlxft.training.adapters import attach_adapters
    from mlxft.training.fast import attention
    from mlxft.training.fast.paths import speed_paths
    from mlxft.training.sft import choose_forward

    data = write_long_rows(work / f"ablation-{length}", PROBLEMS_PER_2048 * length // 2048 + 1, n_rows=1)
    tok, _ = load_tokenizer(str(base))
    row = encode_rows(tok, load_splits(data, ("train",))["train"][:1], None, length)
    model = load_base(str(base), tokenizer=tok).model
    attach_adapters(model, load_recipe(RECIPE, tier=24, overrides=settings(length, 1, False)))
    model.train()
    times: dict[str, list[float]] = {k: [] for k in ABLATION}
    threshold = attention.SCORES_BYTES
    for i in range(rounds + 1):  # round 0: warm-up
        for name, extra in ABLATION.items():
            recipe = load_recipe(RECIPE, tier=24, overrides=settings(length, 1, False) + (extra if isinstance(extra, list) else []))
            paths = speed_paths(recipe, model)
            forward = choose_forward(model, recipe, paths)
            attention.SCORES_BYTES = 2**62 if extra == "one piece" else threshold
            try:
                with paths.applied(model):
                    tic = time.perf_counter()
                    mx.eval(forward.loss_and_grad(model, row))
                    if i:
                        times[name].append(time.perf_counter() - tic)
            finally:
                attention.SCORES_BYTES = threshold
        if i:
            print(f"ablation {length} round {i}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    ratios = {k: statistics.median(t / a for t, a in zip(v, times["mlxft"])) for k, v in times.items()}
    return {"length": length, "seconds": times, "median_time_vs_mlxft": ratios, "load_average": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--checkpoint", default="4096", help="lengths at which both tools use gradient checkpointing")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ablation", type=int, default=2048, help="length of the in-process ablation (0: none)")
    ap.add_argument("--ablation-rounds", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "long_results.json"))
    args = ap.parse_args()
    base = base_folder()
    work = Path(tempfile.mkdtemp(prefix="mlxft-long-"))
    checkpointed = {int(x) for x in args.checkpoint.split(",") if x}
    results = [one_length(base, work, int(n), args.iters, args.rounds, int(n) in checkpointed)
               for n in args.lengths.split(",") if n]
    report = {"what": __doc__.splitlines()[0], "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "iters": args.iters, "lengths": results}
    if args.ablation:
        report["ablation"] = ablation(base, work, args.ablation, args.ablation_rounds)
    write_atomic(Path(args.out), json.dumps(report, indent=1))
    for r in results:
        print(f"{r['length']} tokens{' (both checkpointed)' if r['grad_checkpoint_both'] else ''}: mlxft / mlx_lm.lora "
              f"supervised tokens/s {r['median_ratio_supervised']:.2f}x (target >= 1.5x), total {r['median_ratio_total_tokens']:.2f}x, "
              f"peak memory {r['median_memory_ratio']:.2f}x (target <= 0.5x)")
    if args.ablation:
        for name, r in report["ablation"]["median_time_vs_mlxft"].items():
            print(f"ablation at {args.ablation} tokens: {name}: {r:.2f}x mlxft's step time")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
