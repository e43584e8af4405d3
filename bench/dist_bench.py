"""Data-parallel throughput: 1 rank vs 2 ranks on loopback (mlx.launch, ring backend).

Run: make bench   (or: .venv/bin/python bench/dist_bench.py [--recipe R] [--iters N])
Trains the recipe (the bundled SmolLM2-135M by default, global batch 8) three ways and reads
tokens/s from each run's metrics.jsonl, leaving out the first two steps (warm-up):

  1 rank,  2 BLAS threads   what one process does on this box (the baseline)
  1 rank,  1 BLAS thread    one core's worth of compute
  2 ranks, 1 BLAS thread    each rank on its own core, 4 rows each, gradients all-reduced

It also times the gradient all-reduce alone (mlx's average_gradients over a tree the size
of the recipe's trainable parameters) between two local ranks, and the CPU-seconds per step
of 1 rank and of 2 ranks together (3-step runs subtracted to remove start-up): the compute
the split adds, independent of how much of a busy box the ranks were given.

What a 2-core box can show: both ranks share the same two cores that the single process
already uses, so 2 ranks cannot beat 1 rank x 2 threads here. The useful readings are the
scaling of 2 ranks against one core (near 2x means the split itself costs little) and the
all-reduce time, which on separate machines is what the network adds to every step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHORT = 3  # steps of the runs whose CPU time is subtracted as start-up

ALLREDUCE = """
import json, sys, time
import mlxft
import mlx.core as mx
from mlx.nn.utils import average_gradients
g = mx.distributed.init()
n = int(sys.argv[1])
tree = {"w%d" % i: mx.ones((n // 64,)) for i in range(64)}  # 64 arrays, like a LoRA gradient tree
mx.eval(average_gradients(tree))
times = []
for _ in range(20):
    tic = time.perf_counter()
    mx.eval(average_gradients(tree))
    times.append(time.perf_counter() - tic)
times.sort()
if g.rank() == 0:
    print("ALLREDUCE", json.dumps({"median_ms": 1000 * times[len(times) // 2], "mb": 4 * n / 1e6}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(recipe: str, iters: int, ranks: int, threads: int, runs: Path) -> dict:
    cmd = [sys.executable, "-m", "mlxft.cli", "train", recipe, "--runs-dir", str(runs),
           "--set", f"train.iters={iters}", "--set", "train.report_every=1", "--set", "train.save_every=0",
           "--set", f"train.val_every={iters * 10}", "--set", "train.val_batches=1"]
    if ranks > 1:
        cmd += ["--hosts", ",".join(["127.0.0.1"] * ranks), f"--launch-arg=--starting-port={free_port()}"]
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "MLXFT_DIST_TIMEOUT": "600"}
    tic, cpu = time.perf_counter(), _children_cpu()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall, cpu = time.perf_counter() - tic, _children_cpu() - cpu
    if out.returncode:
        raise SystemExit(f"training failed ({ranks} ranks):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    steps = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "tokens" in m]
    warm, last = steps[1], steps[-1]  # leave out the first two steps (graph building, caches)
    seconds = last["elapsed_sec"] - warm["elapsed_sec"]
    return {
        "tokens_per_sec": (last["tokens"] - warm["tokens"]) / seconds,
        "sec_per_step": seconds / (last["step"] - warm["step"]),
        "final_train_loss": last["train_loss"],
        "wall_sec": wall,
        "cpu_sec": cpu,  # all processes of the run (every rank, the launcher), start-up included
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: ranks, mlx.launch
    return usage.ru_utime + usage.ru_stime


def allreduce_ms(n_params: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(ALLREDUCE)
    launcher = Path(sys.executable).parent / "mlx.launch"
    out = subprocess.run([str(launcher), "--backend", "ring", "-n", "2", f"--starting-port={free_port()}", "--",
                          sys.executable, f.name, str(n_params)], capture_output=True, text=True,
                         env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    os.unlink(f.name)
    line = next((x for x in out.stdout.splitlines() if x.startswith("ALLREDUCE ")), None)
    if line is None:
        raise SystemExit(f"all-reduce benchmark failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(line.split(" ", 1)[1])


def trainable_parameters(runs: Path) -> int:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return json.loads((run / "config.json").read_text())["trainable_parameters"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="smollm2-135m")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    if args.iters <= SHORT:
        ap.error(f"--iters must be more than {SHORT}")

    print(f"data-parallel bench: {args.recipe}, {args.iters} steps of global batch from the recipe, "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mlxft-dist-bench-") as tmp:
        for label, ranks, threads in (("1 rank,  2 BLAS threads", 1, 2), ("1 rank,  1 BLAS thread ", 1, 1),
                                      ("2 ranks, 1 BLAS thread ", 2, 1)):
            runs = Path(tmp) / f"r{ranks}t{threads}"
            runs.mkdir()
            results[label] = r = run_training(args.recipe, args.iters, ranks, threads, runs)
            print(f"  {label}: {r['tokens_per_sec']:7.1f} tokens/s  {r['sec_per_step']:6.2f} s/step  "
                  f"final train loss {r['final_train_loss']:.4f}  (wall {r['wall_sec']:.0f} s incl. start-up)")
        n_params = trainable_parameters(Path(tmp) / "r1t2")
        # CPU-seconds per step, start-up removed (a 3-step run of the same kind is subtracted): how
        # much compute the split adds, whatever share of the busy cores the ranks were given.
        cpu_per_step = {}
        for ranks in (1, 2):
            runs = Path(tmp) / f"short{ranks}"
            runs.mkdir()
            short = run_training(args.recipe, SHORT, ranks, 1, runs)
            long = results["1 rank,  1 BLAS thread " if ranks == 1 else "2 ranks, 1 BLAS thread "]
            cpu_per_step[ranks] = (long["cpu_sec"] - short["cpu_sec"]) / (args.iters - SHORT)
    ar = allreduce_ms(n_params)
    base, one_core, two = (results[k]["tokens_per_sec"] for k in results)
    print(f"  all-reduce of the {n_params / 1e6:.2f}M trainable parameters ({ar['mb']:.1f} MB fp32) between 2 local "
          f"ranks: {ar['median_ms']:.1f} ms median")
    print(f"2 ranks vs 1 rank x 1 thread: {two / one_core:.2f}x (2.0x = perfect split across two cores)")
    print(f"2 ranks vs 1 rank x 2 threads: {two / base:.2f}x (the box has 2 cores: both use all of them, so ~1x "
          f"is the honest ceiling here; separate machines each bring their own cores)")
    print(f"CPU-seconds per step, all ranks together (1 BLAS thread each): 1 rank {cpu_per_step[1]:.2f}, "
          f"2 ranks {cpu_per_step[2]:.2f} ({cpu_per_step[2] / cpu_per_step[1]:.2f}x: the compute the split adds; "
          f"with a free core per rank the 2-rank step would take about {cpu_per_step[2] / 2:.2f} s + the all-reduce)")
    print("same global batch, same data order: the final losses above should agree to ~1e-3 (float rounding)")


if __name__ == "__main__":
    main()
