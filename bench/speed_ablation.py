"""Which training-speed ideas pay on this machine: one process, the same model and data, variants alternated.

Run: make bench   (or: .venv/bin/python bench/speed_ablation.py [--batches N] [--rounds R])

Issue 6 lists ideas to measure and keep only where they pay. Each variant here trains the default
recipe's LoRA (smollm2-135m on its data, batch 8) on the same rows: each round draws
`--batches` x 8 training rows and every variant trains one step per batch of them (batched as the
variant batches: mixed or grouped by system prompt, bucketed by length), after two warm-up steps.
The variants take turns within a round, so a burst of load on a shared machine hits them alike. Reported per variant: supervised and total tokens/s (wall clock), CPU
seconds per step, peak memory, and the ratio to the default configuration. Variants:

- full rows: every row runs its whole prompt (mixed batches; what mlx-lm does, minus its padding
  to the longest row and its head over every position)
- shared prefix, mixed batches: the system prompt once per batch where a batch shares it
- default: shared prefix, mixed batches (a shared prefix per group of rows under one system prompt)
- one prefix per batch, else full rows: the shared prefix only where all of a batch's rows share it
- default + packing: the same batches, rows packed end to end (train.packing)
- grouped: the default + batches drawn from one system prompt (train.group_by_prompt)
- packed: grouped + rows packed end to end (train.packing)
- compiled: grouped, with the loss-and-gradient function under `mx.compile`
- 1 BLAS thread: grouped, with OpenBLAS limited to one thread (Linux only)
- stock SiLU + softmaxes: grouped, with mlx's own SiLU, attention and loss softmaxes instead of mlxft's fast
  CPU ones (train.fast_silu=false)

Results go to bench/ablation.json with the machine description.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxft.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def blas_threads(n: int) -> bool:
    """Set OpenBLAS's thread count where the preloaded library is OpenBLAS."""
    from mlxft import _blas

    if not _blas.loaded_path or "openblas" not in _blas.loaded_path:
        return False
    ctypes.CDLL(_blas.loaded_path).openblas_set_num_threads(n)
    return True


class Variant:
    def __init__(self, name, grouped, step, fast_silu=True):
        self.name, self.grouped, self.step, self.fast_silu = name, grouped, step, fast_silu
        self.wall, self.cpu, self.tokens, self.supervised, self.steps, self.peak = 0.0, 0.0, 0, 0, 0, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=6, help="timed steps per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "ablation.json"))
    ap.add_argument("--only", default="", help="comma-separated parts of variant names to run (the default always runs)")
    args = ap.parse_args()

    from train_bench import machine
    from mlxft.data.encode import encode_rows, load_splits
    from mlxft.training.fast.fastmath import fast_activations
    from mlxft.models.load import load_base
    from mlxft.training.fast.packing import PackedLoss
    from mlxft.training.fast.prefix import SharedPrefixLoss
    from mlxft.recipes import load_recipe
    from mlxft.training.adapters import attach_adapters
    from mlxft.training.batches import batch_order, prefix_groups
    from mlxft.training.sft import collate, make_loss
    from mlxft.training.loss import lm_head

    r = load_recipe("smollm2-135m", tier=8)
    t = r.train
    base = load_base(r.model.source, r.quantize)
    rows = encode_rows(base.tokenizer, load_splits(ROOT / r.data.path, ("train",))["train"], r.data.system_prompt, t.max_seq_length)
    model = base.model
    attach_adapters(model, r)
    model.train()
    opt = optim.AdamW(learning_rate=t.learning_rate)
    lengths = np.array([len(e.ids) for e in rows])
    groups = prefix_groups(rows, t.batch_size)

    def batches(sample: np.ndarray, grouped: bool, round_: int) -> list[list]:
        """The sampled rows in batches, ordered as training would order them (bucketed by length)."""
        order = batch_order(lengths[sample], t.batch_size, t.seed, round_, groups[sample] if grouped else None)
        return [[rows[i] for i in sample[b]] for b in order]

    plain_vg = nn.value_and_grad(model, make_loss(model, r.model.family))
    shared = SharedPrefixLoss(model, lm_head)
    packed = PackedLoss(model, lm_head, t.max_seq_length, shared=shared)
    state = model.state
    compiled_plain = mx.compile(lambda *a: plain_vg(model, *a), inputs=state, outputs=state)
    compiled_shared = mx.compile(lambda *a: shared._value_and_grad(model, *a), inputs=state, outputs=state)

    def full_rows(batch):
        return plain_vg(model, *collate(batch)[:3])

    def with_prefix(batch, compiled=False):
        groups = shared.groups(batch)  # as training runs it: one shared prefix, or a group per prefix
        if not groups:
            x = collate(batch)[:3]
            return compiled_plain(*x) if compiled else plain_vg(model, *x)
        _, a = shared._args(batch, groups)
        return compiled_shared(*a) if compiled else shared._value_and_grad(model, *a)

    def one_prefix(batch):  # stop 15's path: the shared prefix only where all rows share one
        P = shared.prefix_length(batch)
        if not P:
            return plain_vg(model, *collate(batch)[:3])
        return shared._value_and_grad(model, *shared._args(batch, P)[1])

    def with_packing(batch):
        loss, grads, _, _ = packed.loss_and_grad(model, batch)
        return loss, grads

    variants = [
        Variant("full rows", False, full_rows),
        Variant("default (shared prefix, mixed batches)", False, with_prefix),
        Variant("one prefix per batch, else full rows", False, one_prefix),
        Variant("default + packing", False, with_packing),
        Variant("grouped batches (train.group_by_prompt)", True, with_prefix),
        Variant("grouped + packing", True, with_packing),
        Variant("grouped + mx.compile", True, lambda b: with_prefix(b, compiled=True)),
    ]
    variants.append(Variant("grouped, stock SiLU + softmaxes", True, with_prefix, fast_silu=False))
    can_thread = blas_threads(2)
    if can_thread:
        variants.append(Variant("grouped, 1 BLAS thread", True, with_prefix))

    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        variants = [v for v in variants if v.name.startswith("default (") or any(w in v.name for w in wanted)]

    def run(v: Variant, sample: np.ndarray, round_: int, timed: bool) -> None:
        if v.name.endswith("1 BLAS thread"):
            blas_threads(1)
        mx.reset_peak_memory()
        with fast_activations(v.fast_silu):
            train_batches(v, batches(sample, v.grouped, round_), timed)
        v.peak = max(v.peak, mx.get_peak_memory())
        if can_thread:
            blas_threads(2)

    def train_batches(v: Variant, todo: list, timed: bool) -> None:
        for batch in todo:
            tic, cpu = time.perf_counter(), time.process_time()
            loss, grads = v.step(batch)
            opt.update(model, grads)
            mx.eval(loss, model.state, opt.state)
            if timed:
                v.wall += time.perf_counter() - tic
                v.cpu += time.process_time() - cpu
                v.tokens += sum(len(e.ids) - 1 for e in batch)
                v.supervised += sum(int(e.mask[1:].sum()) for e in batch)
                v.steps += 1

    rng = np.random.default_rng(1234)
    warm = rng.choice(len(rows), 2 * t.batch_size, replace=False)
    for v in variants:  # warm-up: first shapes, compilation, caches
        run(v, warm, 0, timed=False)
    per_round = []
    for i in range(args.rounds):
        sample = rng.choice(len(rows), args.batches * t.batch_size, replace=False)
        snap = {}
        for v in variants:
            w0, s0 = v.wall, v.supervised
            run(v, sample, i + 1, timed=True)
            snap[v.name] = (v.supervised - s0) / (v.wall - w0)
        per_round.append(snap)
        print(f"round {i + 1}: " + ", ".join(f"{k}: {x:.1f}" for k, x in snap.items()) + " supervised tok/s", flush=True)

    default = next(v for v in variants if v.name.startswith("default ("))
    result = {"what": "speed ablation of mlxft's training step, default recipe smollm2-135m, batch 8; "
                      f"{args.rounds} rounds x {args.batches} steps per variant, alternating",
              "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "variants": {}}
    print(f"\n{'variant':<42} {'sup tok/s':>9} {'tok/s':>7} {'CPU s/step':>10} {'peak GB':>8} {'vs default':>10}")
    for v in variants:
        # Ratio per round (the variants of a round saw the same load), then the median.
        ratio = statistics.median(rnd[v.name] / rnd[default.name] for rnd in per_round)
        row = {"supervised_tokens_per_sec": v.supervised / v.wall, "tokens_per_sec": v.tokens / v.wall,
               "cpu_seconds_per_step": v.cpu / v.steps, "peak_memory_gb": v.peak / 1e9,
               "median_ratio_to_default_supervised": ratio, "steps": v.steps}
        result["variants"][v.name] = row
        print(f"{v.name:<42} {row['supervised_tokens_per_sec']:>9.2f} {row['tokens_per_sec']:>7.0f} "
              f"{row['cpu_seconds_per_step']:>10.2f} {row['peak_memory_gb']:>8.2f} {ratio:>9.2f}x")
    result["per_round_supervised_tokens_per_sec"] = per_round
    write_atomic(Path(args.out), json.dumps(result, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
