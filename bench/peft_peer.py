"""HF PEFT LoRA on PyTorch CPU: the second training peer of `make bench` (bench/train_bench.py).

Run: .venv/bin/python bench/peft_peer.py --model FOLDER [--iters 20] [--out peft.json]
Needs the `bench` extra (torch CPU + peft): pip install -e '.[bench]'.

It trains what `mlxft train` trains, the way a PEFT user would: the same fp32 base folder
(loaded with transformers' AutoModelForCausalLM in float32), LoRA with the recipe's rank,
scale (peft's lora_alpha = scale x rank), dropout and targets on the last `lora.num_layers`
blocks only (peft's layers_to_transform), and torch's AdamW taking mlxft's AdamW steps (the
recipe's learning rate and schedule, mlx's missing bias correction, gradient clipping, weight
decay). The rows, their token masks and the batches are mlxft's own (encode_rows, and its
loop's batch stream, mlxft.training.batches), so every step sees the same rows as mlxft's step of the same index;
batches are right-padded, labels -100 outside the supervised positions.
Timing and counts follow the other peers: the first reporting window is dropped as warm-up;
supervised tokens are the answer's tokens and its end-of-turn token (mlxft's mask).

Memory is not mlx's allocator count: torch on the CPU has none that covers everything, so
`peak_memory_gb` here is the process's peak resident set during training minus its resident
set before the model was loaded (weights, LoRA, optimizer state, activations, allocator caches).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "smollm2-135m"
WINDOW = 5  # steps per reporting window, as in train_bench.py
IGNORE = -100  # label of positions without loss (torch's cross_entropy ignore_index)

MEMORY_DEFINITION = (
    "peak resident set size of the torch process during training minus its resident set before the "
    "model was loaded (Linux VmHWM after a reset; weights + LoRA + optimizer + activations + allocator caches); "
    "the mlx peers report mx.get_peak_memory(), mlx's own allocator peak"
)


# ---------------------------------------------------------------- mlxft's rows and batches (no torch)


def pad_batch(rows) -> dict:
    """Right-padded next-token inputs and labels of mlxft Encoded rows, as numpy int64 arrays.

    Like mlxft's collate: inputs are ids[:-1], targets ids[1:]; a target is a label only where
    the row's mask supervises it, else -100. The labels are already shifted, so the loss is a
    plain cross-entropy over them (HF's own loss would shift again and drop a row's last target).
    """
    T = max(len(r.ids) for r in rows) - 1
    input_ids = np.zeros((len(rows), T), dtype=np.int64)
    attention_mask = np.zeros((len(rows), T), dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE, dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r.ids) - 1
        input_ids[i, :n] = r.ids[:-1]
        attention_mask[i, :n] = 1
        labels[i, :n] = np.where(r.mask[1:], r.ids[1:], IGNORE)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "tokens": int(attention_mask.sum()), "supervised_tokens": int((labels != IGNORE).sum()),
    }


def mlxft_batches(model: Path, recipe, data_dir: Path, iters: int) -> list[dict]:
    """The first `iters` padded training batches `mlxft train RECIPE --model MODEL` takes."""
    from mlxft.data.encode import encode_rows, load_splits, load_tokenizer
    from mlxft.training.batches import EpochBatches
    from mlxft.training.fast.paths import speed_paths
    from mlxft.training.progress import Progress

    t = recipe.train
    tokenizer, _ = load_tokenizer(str(model))
    rows = encode_rows(tokenizer, load_splits(data_dir, ("train",))["train"], recipe.data.system_prompt, t.max_seq_length)
    if len(rows) < t.batch_size:
        raise SystemExit(f"{data_dir}: {len(rows)} training rows, fewer than batch_size={t.batch_size}")
    # The peer draws its batches through mlxft's own batch stream, so it follows mlxft's order
    # whatever that order becomes (grouped by system prompt where mlxft's speed paths say so).
    batches, progress = EpochBatches(rows, t, grouped=speed_paths(recipe).grouped_batches), Progress()
    return [pad_batch(batches.next(progress)) for _ in range(iters)]


def learning_rates(recipe, iters: int) -> list[float]:
    """mlxft's learning rate for each of `iters` steps (its own schedule, evaluated once)."""
    from mlxft.training.adapters import build_schedule

    schedule = build_schedule(recipe, iters)
    return [float(schedule(k).item()) for k in range(iters)]


# ---------------------------------------------------------------- memory of this process


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no /proc (macOS): the peak so far, an upper bound of the current size
        return _peak_rss_bytes()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------- the torch side


def peft_model(model: Path, recipe):
    """The base in float32 with peft LoRA on the recipe's targets of its last `lora.num_layers` blocks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    n_layers = base.config.num_hidden_layers
    num = n_layers if recipe.lora.num_layers == -1 else recipe.lora.num_layers
    if not 0 < num <= n_layers:
        raise SystemExit(f"lora.num_layers={recipe.lora.num_layers} but the model has {n_layers} layers")
    config = LoraConfig(
        r=recipe.lora.rank,
        lora_alpha=recipe.lora.scale * recipe.lora.rank,  # peft scales by alpha / r; mlx-lm by `scale`
        lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.targets),  # "self_attn.q_proj" matches as a name suffix
        layers_to_transform=list(range(n_layers - num, n_layers)),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.train()
    return model


def train(model, batches: list[dict], lrs: list[float], recipe) -> tuple[list[float], list[float]]:
    """AdamW steps over `batches`; returns (time after each step, loss of each step)."""
    import torch
    import torch.nn.functional as F

    t = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    b1, b2 = 0.9, 0.999  # mlx's and torch's AdamW defaults alike
    optimizer = torch.optim.AdamW(params, lr=lrs[0], betas=(b1, b2), eps=1e-8, weight_decay=t.weight_decay)
    times, losses = [], []
    for step, (batch, lr) in enumerate(zip(batches, lrs), 1):
        logits = model(input_ids=torch.from_numpy(batch["input_ids"]),
                       attention_mask=torch.from_numpy(batch["attention_mask"]), use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), torch.from_numpy(batch["labels"]).flatten(),
                               ignore_index=IGNORE)
        loss.backward()
        if t.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        # mlxft's optimizer (mlx's AdamW) has no bias correction, torch's has: the learning rate
        # x (1 - b1^t) / sqrt(1 - b2^t) makes torch take mlx's step (eps aside), the weight decay
        # divided by the same factor keeps mlx's decay of lr x weight_decay.
        c = (1 - b1**step) / math.sqrt(1 - b2**step)
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = lr * c, t.weight_decay / c
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter())
    return times, losses


def summarize(times: list[float], losses: list[float], batches: list[dict], window: int) -> dict:
    """The fields run_mlxft / run_mlx_lm report, over the steps after the first window."""
    if len(times) <= window:
        raise SystemExit(f"--iters {len(times)} leaves no timed steps after the first window of {window}")
    sec = times[-1] - times[window - 1]
    timed = batches[window:]
    rows = sum(len(b["input_ids"]) for b in timed)
    return {
        "steps_timed": len(timed), "seconds": sec,
        "tokens_per_sec": sum(b["tokens"] for b in timed) / sec,
        "supervised_tokens_per_sec": sum(b["supervised_tokens"] for b in timed) / sec,
        "rows_per_sec": rows / sec,
        "train_loss": [float(np.mean(losses[i : i + window])) for i in range(0, len(losses), window)],
        "step_seconds": np.diff(times).round(3).tolist(),  # steps 2.. (shows a busy machine's stalls)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fp32 mlx-lm / HF folder (config.json + safetensors)")
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--data", help="data folder (default: the recipe's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, as for mlxft train")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--window", type=int, default=WINDOW, help="steps per reporting window (the first is warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", help="write the result JSON here (default: print it)")
    args = ap.parse_args()

    # Stock torch uses its own MKL; mlxft is imported only for the rows and the batch order,
    # so it must not preload OpenBLAS into this process (mlx does no work here).
    os.environ["MLXFT_BLAS"] = "none"
    # OpenMP's default spin-waiting stalls torch's threads whenever another process holds a core:
    # on the shared 2-core box at load ~5 the same steps ran at 22 tokens/s spinning vs 128 passive.
    # Passive waiting gives the peer its best on a shared machine (set OMP_WAIT_POLICY to override).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load_at_start = os.getloadavg()
    import torch
    from mlxft.recipes import load_recipe

    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, tier=8, overrides=args.set)
    if recipe.train.grad_accumulation != 1:
        raise SystemExit("the PEFT peer mirrors train.grad_accumulation=1 only (one batch per optimizer step)")
    torch.manual_seed(recipe.train.seed)
    data_dir = Path(args.data) if args.data else ROOT / recipe.data.path
    batches = mlxft_batches(Path(args.model), recipe, data_dir, args.iters)
    lrs = learning_rates(recipe, args.iters)

    rss_before_model = _rss_bytes()
    model = peft_model(Path(args.model), recipe)
    reset = _reset_peak_rss()  # the load's transient copies are not training memory
    times, losses = train(model, batches, lrs, recipe)
    peak = _peak_rss_bytes()

    result = summarize(times, losses, batches, args.window)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.update({
        "peak_memory_gb": (peak - rss_before_model) / 1e9,
        "peak_rss_gb": peak / 1e9,
        "peak_memory_definition": MEMORY_DEFINITION + ("" if reset else " (peak not reset after loading: includes the load)"),
        "trainable_parameters": trainable,
        "torch": torch.__version__, "peft": _version("peft"), "transformers": _version("transformers"),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
    })
    text = json.dumps(result, indent=1)
    if args.out:
        from mlxft.files import write_atomic

        write_atomic(Path(args.out), text)
    else:
        print(text)


def _version(name: str) -> str:
    import importlib.metadata as md

    return md.version(name)


if __name__ == "__main__":
    main()
