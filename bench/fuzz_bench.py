"""Hostile input at every entry point, counted: the hand-written cases plus a long fuzz run per target.

    .venv/bin/python bench/fuzz_bench.py [--examples 1000] [--seed 0] [--only data,gguf]

The targets are the test suite's (tests/fuzz_targets*.py: data files, synth seeds, recipe YAML and
--set, eval suite YAML, run folders, the server's request bodies and raw HTTP requests, GGUF
headers); the suite runs each with a small fixed budget, this runs many more random cases. Prints,
per entry point, the cases tried (hand-written + fuzzed), how many gave a valid result or a typed
error, and how many gave a traceback, modified an input file, or hung; writes the table and the
first failures to bench/fuzz_results.json. Exit 1 if any case broke the property.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the fuzz targets and tiny-model fixtures live with the tests
sys.path.insert(0, str(HERE.parent / "tests" / "models"))  # the GGUF target builds its files with test_gguf's writers
os.environ.setdefault("MLXFT_CACHE", tempfile.mkdtemp(prefix="mlxft-fuzz-cache-"))  # token-check cache entries
os.environ.setdefault("MLXFT_RUNS", tempfile.mkdtemp(prefix="mlxft-fuzz-runs-"))

import mlxft  # noqa: E402,F401  (OpenBLAS before mlx)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402

from fuzz_harness import Tally  # noqa: E402


def all_targets() -> dict[str, object]:
    import fuzz_targets
    import fuzz_targets_faults
    import fuzz_targets_io
    import fuzz_targets_runs

    targets = {"data": fuzz_targets.DATA, "seeds": fuzz_targets.SEEDS, "recipe": fuzz_targets.RECIPE,
               "suite": fuzz_targets.SUITE, "runs": fuzz_targets_runs.runs_target()}
    targets.update(fuzz_targets_io.targets())
    targets["faults"] = fuzz_targets_faults.faults_target()
    return targets


def fuzz(target, examples: int, seed: int, tally: Tally) -> None:
    """Run `examples` random cases of `target` (generation only: nothing is shrunk, every case counts)."""
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(target.strategy)
    def body(case):
        tally.add(target.entry, target.run(case), fuzzed=True, case=case)

    body()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="fuzzed cases per entry point")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--only", default="", help="comma-separated target names (default: all)")
    parser.add_argument("--out", default=str(HERE / "fuzz_results.json"))
    args = parser.parse_args()
    targets = all_targets()
    chosen = [t for t in args.only.split(",") if t] or list(targets)
    tally, timings = Tally(), {}
    print(f"fuzz seed {args.seed}, {args.examples} fuzzed cases per entry point", flush=True)
    try:
        for name in chosen:
            target = targets[name]
            tic = time.perf_counter()
            for label, case in target.hand:
                tally.add(target.entry, target.run(case), fuzzed=False, case=label)
            fuzz(target, args.examples, args.seed, tally)
            timings[target.entry] = round(time.perf_counter() - tic, 1)
            row = tally.rows[target.entry]
            print(f"  {target.entry}: {row['hand']} + {row['fuzzed']} cases in {timings[target.entry]} s", flush=True)
    finally:
        import fuzz_targets_io

        fuzz_targets_io.stop()
    table = tally.table()
    print("\n" + table)
    broken = {e: f[:3] for e, f in tally.failures.items()}
    for entry, details in broken.items():
        print(f"\n{entry}: {len(tally.failures[entry])} cases broke the property; first:\n{details[0]}")
    Path(args.out).write_text(json.dumps({"seed": args.seed, "examples": args.examples, "rows": tally.rows,
                                          "seconds": timings, "table": table, "failures": broken}, indent=1) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip teardown: mlx 0.32 can abort at exit after the server's generation thread ran (see serve_load.py)
