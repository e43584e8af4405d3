"""Eval generation speed: batched (as `mlxft eval` runs it) vs one prompt at a time, real SmolLM2.

    .venv/bin/python bench/eval_bench.py [--rows 64] [--batch-size 32] [--min-ratio 3]

Greedy replies (max 8 tokens, as the commit-type suite) to an evenly spaced subsample of
the commit-type test split, three ways, alternating so machine noise hits all of them:
  one-at-a-time   mlx-lm's generate() per prompt (what a simple eval loop does)
  batched         mlx-lm's batch_generate, all prompts prefilled and decoded together
  batched+prefix  mlxft.evaluation.evaluate.generate_batch: batched, the shared prompt head computed once
Prints seconds, prompts/s, the ratios to one-at-a-time, and how many replies agree with it.
Exit 1 when the eval path (batched+prefix) is under --min-ratio x one-at-a-time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mlxft  # noqa: F401  (OpenBLAS before mlx)

from mlxft.data.encode import prompt_ids
from mlxft.inference.batch import generate_batch
from mlxft.models.load import load_base
from mlxft.evaluation.suites import load_suite, suite_examples


def one_at_a_time(model, tokenizer, prompts, max_tokens):
    from mlx_lm.generate import generate

    return [generate(model, tokenizer, p, max_tokens=max_tokens) for p in prompts]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="Test rows (evenly spaced subsample of 160).")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds; the best time of each way counts.")
    parser.add_argument("--min-ratio", type=float, default=3.0)
    args = parser.parse_args()

    suite = load_suite("commit-type")
    examples = suite_examples(suite, None)
    step = max(1, len(examples) // args.rows)
    examples = examples[::step][: args.rows]
    base = load_base("builtin:smollm2-135m-instruct", None, training=False)
    model, tokenizer = base.model, base.tokenizer
    prompts = [prompt_ids(tokenizer, e.messages) for e in examples]
    max_tokens = suite.max_tokens
    ways = {
        "one-at-a-time": lambda: one_at_a_time(model, tokenizer, prompts, max_tokens),
        "batched": lambda: generate_batch(model, tokenizer, prompts, max_tokens, args.batch_size, share_prefix=False),
        "batched+prefix": lambda: generate_batch(model, tokenizer, prompts, max_tokens, args.batch_size),
    }
    generate_batch(model, tokenizer, prompts[:4], 2)  # warm-up: first-call compilation is not what we measure
    best: dict[str, float] = {}
    replies: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for name, fn in ways.items():
            tic = time.perf_counter()
            replies[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - tic)
    ref = replies["one-at-a-time"]
    print(f"eval generation, SmolLM2-135M ({base.precision}), {len(prompts)} commit-type test prompts, "
          f"max {max_tokens} tokens, batch {args.batch_size}, best of {args.rounds} alternating rounds")
    results = {}
    for name, seconds in best.items():
        ratio = best["one-at-a-time"] / seconds
        agree = sum(a.strip() == b.strip() for a, b in zip(replies[name], ref))
        results[name] = {"seconds": round(seconds, 2), "ratio": round(ratio, 2), "agree": agree}
        print(f"  {name:<15} {seconds:7.1f} s  {len(prompts) / seconds:6.2f} prompts/s  "
              f"{ratio:5.2f}x one-at-a-time  same reply {agree}/{len(prompts)}")
    ratio = results["batched+prefix"]["ratio"]
    verdict = "PASS" if ratio >= args.min_ratio else "FAIL"
    print(f"eval batched generation speed-up: {ratio:.2f}x (target >= {args.min_ratio:g}x): {verdict}")
    print(json.dumps({"eval_bench": results}))
    return 0 if ratio >= args.min_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
