"""A second training workload, unlike the default: `mlxft train` vs `mlx_lm.lora` vs `mlx-lm-lora`, alternating.

Run: make bench   (or: .venv/bin/python bench/answers_bench.py [--iters N] [--rounds R])

GSM8K problems whose worked answers are 100-300 tokens (841 real rows; bench/bench_data.py): no
system prompt in the data and long answers, where the default workload has one shared system
prompt and 1-3 token labels. (SmolLM2's chat template still puts its own default system turn in
front of every row, for every tool alike; the `mlxft, no shared prefix` variant shows the lead
without the shared-prefix forward.) Same protocol as bench/train_bench.py: the bundled SmolLM2-135M
in fp32, LoRA rank 8 on the 7 linear layers of the last 16 blocks, batch 8, max length 512, the
same OpenBLAS, the same rows per step (mlxft's order), the tools in turn each round, the first
`--skip` steps (and for the mlx-lm tools the step carrying the final validation) not timed.
Reported per tool: supervised tokens/s (answer + end-of-turn, one definition for all), total
tokens/s, peak memory (mx.get_peak_memory), and the ratios within each round. Results go to
bench/answers_results.json.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from bench_data import write_answer_rows  # noqa: E402
from peers import end_of_turn, mlxft_order, run_mlx_tool, run_mlxft, tool_config  # noqa: E402
from train_bench import base_folder, machine  # noqa: E402

RECIPE = "smollm2-135m"
MAX_LENGTH = 512
# mlxft variants ("name": extra --set overrides): the first two run by default; the others are the
# ablation of the speed ideas on this workload (--variants all).
VARIANTS = {"mlxft": [], "mlxft, no shared prefix": ["train.shared_prefix=false"],
            "mlxft, packing": ["train.packing=true"], "mlxft, mlx's own kernels": ["train.fast_silu=false"],
            "mlxft, freed memory returned": ["train.keep_freed_memory=false"]}
DEFAULT_VARIANTS = ["mlxft", "mlxft, no shared prefix"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=";".join(DEFAULT_VARIANTS), help="mlxft variants (names from VARIANTS, ';'-separated, or all)")
    ap.add_argument("--peers", default="mlx_lm,mlx_lm_lora")
    ap.add_argument("--out", default=str(ROOT / "bench" / "answers_results.json"))
    args = ap.parse_args()
    from mlxft.data.encode import load_tokenizer
    from mlxft.recipes import load_recipe
    from mlxft.training.plan import encoded_rows

    base = base_folder()
    work = Path(tempfile.mkdtemp(prefix="mlxft-answers-"))
    tok, _ = load_tokenizer(f"{base}")
    data, n_train = write_answer_rows(work / "rows", tok)
    common = [f"train.max_seq_length={MAX_LENGTH}", "data.system_prompt=null", f"train.iters={args.iters}"]
    recipe = load_recipe(RECIPE, tier=24, overrides=common)
    order = mlxft_order(recipe, encoded_rows(recipe.model.source, str(data), None, MAX_LENGTH))
    eot = end_of_turn(base)
    peers = [p for p in args.peers.split(",") if p and (p != "mlx_lm_lora" or importlib.util.find_spec("mlx_lm_lora"))]
    configs = {tool: tool_config(tool, base, data, work, iters=args.iters + 1, batch_size=recipe.train.batch_size,
                                 max_seq_length=MAX_LENGTH, num_layers=recipe.lora.num_layers,
                                 learning_rate=recipe.train.learning_rate,
                                 lora={"rank": recipe.lora.rank, "scale": recipe.lora.scale, "dropout": 0.0,
                                       "keys": list(recipe.lora.targets)}) for tool in peers}
    variants = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(";") if v]
    rounds = []
    for i in range(args.rounds):
        got = {"load_average": os.getloadavg()}
        for name in variants:
            got[name] = run_mlxft(RECIPE, base, data, work, common + VARIANTS[name], skip=args.skip)
        for tool in peers:
            got[tool] = run_mlx_tool(tool, configs[tool], order, eot, work, skip=args.skip)
        for name in variants + peers:
            m = got[name]
            print(f"round {i + 1} {name:<30} {m['supervised_tokens_per_sec']:6.1f} supervised tok/s, "
                  f"{m['tokens_per_sec']:5.0f} tok/s, peak {m['peak_memory_gb']:.2f} GB", flush=True)
        got["ratios"] = {f"{a} / {b}": {"supervised": got[a]["supervised_tokens_per_sec"] / got[b]["supervised_tokens_per_sec"],
                                        "total": got[a]["tokens_per_sec"] / got[b]["tokens_per_sec"],
                                        "memory": got[a]["peak_memory_gb"] / got[b]["peak_memory_gb"]}
                         for a in variants for b in peers}
        rounds.append(got)
    summary = {key: {k: statistics.median(r["ratios"][key][k] for r in rounds) for k in ("supervised", "total", "memory")}
               for key in rounds[0]["ratios"]}
    report = {"what": __doc__.splitlines()[0], "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "rows": {"train": n_train, "answers_tokens": "100-300"}, "iters": args.iters, "skip": args.skip,
              "rounds": rounds, "median_ratios": summary}
    write_atomic(Path(args.out), json.dumps(report, indent=1))
    for key, r in summary.items():
        print(f"{key}: supervised tokens/s {r['supervised']:.2f}x, total {r['total']:.2f}x, peak memory {r['memory']:.2f}x"
              + (" (target >= 2x at <= 1.0x memory)" if key == "mlxft / mlx_lm" else ""))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
