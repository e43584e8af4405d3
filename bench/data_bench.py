"""Data speed: `mlxft data prepare` + `mlxft data check` on 100k chat rows.

Run: make bench   (or: .venv/bin/python bench/data_bench.py [--rows N] [--recipe R])
Generates the rows into a temporary folder, runs both commands in one process with the
recipe's tokenizer (the bundled SmolLM2 by default), prints seconds and rows/s per step.
Target: under 60 s in all on a 2-core Linux box. `check` reuses the token measurement
`prepare` made of the same rows (content-addressed cache); the bench also times a check
that measures everything itself.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx)
from mlxft.data.check import check_path, recipe_and_tokenizer
from mlxft.data.prepare import prepare_dataset

WORDS = ("fix bump add refactor parser cache docs test build release memory leak crash flaky "
         "endpoint config typo speed retry timeout logging schema migrate").split()


def make_rows(n: int, seed: int = 0):
    """Chat rows like real data: one system prompt, 1-3 turns, 5-60 word messages."""
    rng = random.Random(seed)
    for i in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}]
        for _ in range(rng.choice((1, 1, 2, 3))):
            msgs.append({"role": "user", "content": f"#{i} " + " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))})
            msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(3, 40)))})
        yield {"messages": msgs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--recipe", default="smollm2-135m")
    args = ap.parse_args()
    recipe, tokenizer, why = recipe_and_tokenizer(args.recipe, overrides=["data.system_prompt=You are a helpful assistant."])
    if tokenizer is None:
        raise SystemExit(f"no tokenizer for {args.recipe}: {why}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.jsonl"
        with open(src, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in make_rows(args.rows))
        print(f"{args.rows} rows, {src.stat().st_size / 2**20:.0f} MiB, tokenizer of {recipe.name}")
        t0 = time.perf_counter()
        prepare_dataset(src, Path(tmp) / "out", tokenizer=tokenizer, recipe=recipe, log=lambda s: None)
        t1 = time.perf_counter()
        report = check_path(Path(tmp) / "out", recipe, tokenizer)
        t2 = time.perf_counter()
        os.environ["MLXFT_NO_CHECK_CACHE"] = "1"  # the check alone, rendering and tokenizing itself
        check_path(Path(tmp) / "out", recipe, tokenizer)
        t3 = time.perf_counter()
        del os.environ["MLXFT_NO_CHECK_CACHE"]
    for name, secs in (("prepare", t1 - t0), ("check", t2 - t1), ("total", t2 - t0)):
        print(f"{name:8} {secs:7.1f} s  {args.rows / secs:9,.0f} rows/s")
    print(f"(check without prepare's cached token measurement: {t3 - t2:.1f} s)")
    print(f"check: {len(report.errors)} errors, {len(report.warnings)} warnings")


if __name__ == "__main__":
    main()
