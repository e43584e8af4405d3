"""Run the training tools the benchmarks compare, each in its own process, on the same rows per step.

- `run_mlxft`: `mlxft train` (the CLI), timed from its metrics.jsonl;
- `run_mlx_tool("mlx_lm", ...)`: stock `mlx_lm.lora`; `run_mlx_tool("mlx_lm_lora", ...)`: the
  `mlx-lm-lora` package's SFT trainer (PyPI `mlx-lm-lora`, bench extra).

Both mlx-lm tools run through a wrapper (WRAPPER) that changes no compute: it imports mlxft first
(the same OpenBLAS), serves mlxft's batch order (the same rows per step, built as the tool builds its
own batches) and records, each time the trainer asks for a training batch, the time, the peak
memory and the batch's tokens (mlx-lm's own supervised count and ours: the answer and its
end-of-turn token). mlx-lm-lora assumes Metal: on the CPU backend the wrapper supplies
`mx.device_info()["max_recommended_working_set_size"]` (the machine's RAM) and makes
`mx.set_wired_limit` a no-op; its final fuse is turned off in its config. A memory limit, when
given, is set with `mx.set_memory_limit` in every tool's process before training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

WRAPPER = r"""
import json, sys, time, functools
import mlxft  # OpenBLAS before mlx, as for mlxft
import numpy as np
import mlx.core as mx
spec = json.load(open(sys.argv.pop(1)))
if spec["memory_limit"]:
    mx.set_memory_limit(spec["memory_limit"])
eot, order, records = spec["eot"], spec["order"], []

def build(dataset, indices, max_seq_length):
    # as mlx-lm builds a batch: right-padded to 1 + a multiple of 32 (capped), (offset, length) pairs
    items = [dataset[j] for j in indices]
    toks, offsets = zip(*items) if len(items[0]) == 2 else (items, [0] * len(items))
    lengths = [min(len(x), max_seq_length) for x in toks]
    width = min(1 + 32 * ((max(len(x) for x in toks) + 31) // 32), max_seq_length)
    arr = np.zeros((len(toks), width), np.int32)
    for i, x in enumerate(toks):
        arr[i, : lengths[i]] = x[: lengths[i]]
    ours = 0
    for row, off, n in zip(arr, offsets, lengths):
        comp = list(row[off:n])
        ours += comp.index(eot) + 1 if eot in comp else len(comp)
    # the trainers ask for batch k+1 right after step k's mx.eval: these times time the steps
    records.append([time.perf_counter(), mx.get_peak_memory(), int(sum(lengths)),
                    int(sum(n - off + 1 for off, n in zip(offsets, lengths))), int(ours)])
    return mx.array(arr), mx.array(list(zip(offsets, lengths)))

if spec["tool"] == "mlx_lm":
    from mlx_lm import lora
    from mlx_lm.tuner import trainer

    def batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
        if not loop:  # validation: stock
            yield from trainer.iterate_batches(dataset, batch_size, max_seq_length, loop=loop, seed=seed, comm_group=comm_group)
            return
        for k in range(10**9):
            yield build(dataset, order[k % len(order)], max_seq_length)

    lora.train = functools.partial(trainer.train, iterate_batches=batches)
    main = lora.main
else:
    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:  # the CPU backend: mlx-lm-lora assumes Metal
        ram = int(info.get("memory_size") or 0)
        if not ram:
            import os
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        mx.device_info = lambda: {**info, "max_recommended_working_set_size": ram}
        mx.set_wired_limit = lambda limit: 0
    from mlx_lm_lora import train as lora_train
    from mlx_lm_lora.trainer import sft_trainer
    step = {"k": 0}

    def batches(dataset, batch_size, max_seq_length, train=False):
        if not train:  # validation: stock
            yield from sft_trainer.iterate_batches(dataset, batch_size, max_seq_length, train=False)
            return
        while True:  # the trainer makes a new iterator every step and takes one batch
            k = step["k"]
            step["k"] += 1
            yield build(dataset, order[k % len(order)], max_seq_length)

    lora_train.train_sft = functools.partial(sft_trainer.train_sft, iterate_batches=batches)
    main = lora_train.main
try:
    main()
finally:  # the peak over the whole run, its last step and final validation included
    open(spec["out"], "w").write(json.dumps({"records": records, "peak": mx.get_peak_memory()}))
"""


def tool_config(tool: str, base: Path, data: Path, work: Path, *, iters: int, batch_size: int, max_seq_length: int,
                num_layers: int, lora: dict, learning_rate: float, grad_checkpoint: bool = False) -> Path:
    """The tool's YAML config (JSON is YAML): our LoRA, rows, lengths and steps; one validation batch."""
    cfg = {
        "model": str(base), "train": True, "data": str(data), "fine_tune_type": "lora", "mask_prompt": True,
        "num_layers": num_layers, "batch_size": batch_size, "iters": iters, "val_batches": 1,
        "steps_per_report": max(1, iters), "steps_per_eval": 10**6, "save_every": 10**6,
        "learning_rate": learning_rate, "max_seq_length": max_seq_length, "seed": 0,
        "grad_checkpoint": grad_checkpoint, "adapter_path": str(work / f"{tool}-adapters"),
        "lora_parameters": lora,
    }
    if tool == "mlx_lm_lora":
        cfg.update({"train_mode": "sft", "train_type": "lora", "fuse": False, "optimizer": "adamw"})
    path = work / f"{tool}-{time.time_ns()}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def run_mlx_tool(tool: str, config: Path, order: list[list[int]], eot: int, work: Path, *, skip: int,
                 memory_limit: int | None = None) -> dict:
    """One run of `tool` ("mlx_lm" or "mlx_lm_lora"); the first `skip` steps (warm-up, the first
    validation) and the last (the final validation) are left out of the timing."""
    out = work / f"{tool}-records-{time.time_ns()}.json"
    spec = work / f"{tool}-spec-{time.time_ns()}.json"
    spec.write_text(json.dumps({"tool": tool, "eot": eot, "order": order, "out": str(out), "memory_limit": memory_limit}))
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(spec), "--config", str(config)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
        raise RuntimeError(f"{tool} exited {proc.returncode}: {' | '.join(tail)}")
    got = json.loads(out.read_text())
    rec = np.array(got["records"])
    result = {"peak_memory_gb": got["peak"] / 1e9}
    lo, hi = skip, len(rec) - 1  # rec[k] is taken after step k; steps lo+1 .. hi
    if hi <= lo:  # a memory-only run: nothing timed
        return result
    sec = float(rec[hi, 0] - rec[lo, 0])
    tokens = rec[lo:hi, 2:].sum(axis=0)  # batch k is counted in rec[k-1]
    return {**result, "steps_timed": int(hi - lo), "seconds": sec, "seconds_per_step": sec / (hi - lo),
            "tokens_per_sec": float(tokens[0]) / sec, "supervised_tokens_per_sec": float(tokens[2]) / sec,
            "own_supervised_tokens_per_sec": float(tokens[1]) / sec}


MLXFT_CLI = "import sys, mlxft, mlx.core as mx; limit = int(sys.argv.pop(1)); limit and mx.set_memory_limit(limit); " \
            "from mlxft.cli import main; sys.argv[0] = 'mlxft'; main()"


def run_mlxft(recipe: str, base: Path, data: Path, work: Path, sets: list[str], *, skip: int,
              memory_limit: int | None = None) -> dict:
    """One `mlxft train` run (report every step, no checkpoints); the first `skip` steps are left out."""
    runs = work / f"mlxft-{time.time_ns()}"
    cmd = [sys.executable, "-c", MLXFT_CLI, str(memory_limit or 0), "train", recipe, "--model", str(base),
           "--data", str(data), "--runs-dir", str(runs), "--set", "train.report_every=1", "--set", "train.save_every=0",
           "--set", "train.val_every=1000000", "--set", "train.val_batches=1", "--set", "train.warmup_steps=0"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
        raise RuntimeError(f"mlxft train exited {proc.returncode}: {' | '.join(tail)}")
    (metrics,) = runs.glob("*/metrics.jsonl")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    w = [m for m in lines if "tokens" in m]
    first, last = w[skip - 1] if skip else {"step": 0, "tokens": 0, "supervised_tokens": 0, "elapsed_sec": 0.0}, w[-1]
    sec = last["elapsed_sec"] - first["elapsed_sec"]
    steps = last["step"] - first["step"]
    if steps <= 0:  # a memory-only run: nothing timed
        return {"peak_memory_gb": max(m["peak_memory_gb"] for m in w)}
    return {"steps_timed": steps, "seconds": sec, "seconds_per_step": sec / steps,
            "tokens_per_sec": (last["tokens"] - first["tokens"]) / sec,
            "supervised_tokens_per_sec": (last["supervised_tokens"] - first["supervised_tokens"]) / sec,
            "peak_memory_gb": max(m["peak_memory_gb"] for m in w), "train_loss": [m["train_loss"] for m in w]}


def mlxft_order(recipe, rows) -> list[list[int]]:
    """mlxft train's first-epoch batches as row indices (train.jsonl lines): what every tool trains on."""
    from mlxft.training.batches import EpochBatches
    from mlxft.training.fast.paths import speed_paths

    return [[int(i) for i in b] for b in EpochBatches(rows, recipe.train, grouped=speed_paths(recipe).grouped_batches).order(0)]


def end_of_turn(base: Path) -> int:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(base).convert_tokens_to_ids("<|im_end|>")
