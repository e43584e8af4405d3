"""GRPO speed: `mlxft train --method grpo` vs mlx-lm-lora's GRPO, alternating, same model, prompts and reward.

Run: make bench   (or: .venv/bin/python bench/grpo_bench.py [--iters N] [--rounds R])

Same base (the bundled SmolLM2-135M as an fp32 mlx-lm folder), the same 16 prompts of
datasets/structured (system prompt, user message; the reference JSON as the answer), the same
reward (JSON Schema validity by mlxft's own json_schema scorer, registered as an mlx-lm-lora reward
function), group size, completion length, temperature, KL weight, clip epsilon, learning rate,
LoRA (rank 8, scale 2, 7 targets x 16 blocks) and iterations. The tools alternate, each in its own
subprocess, `--rounds` times; each run's first step (warm-up) is dropped from its speed. Reported:
seconds per step, generated tokens per second, and the mean reward of the last steps, for each
tool and as ratios within a round (the machine is shared).

mlx-lm-lora 5.10.2 assumes Metal: on mlx's CPU backend it dies at
`mx.device_info()["max_recommended_working_set_size"]` and `mx.set_wired_limit`. The wrapper below
supplies that one key and makes `set_wired_limit` a no-op; the bench output says so. Its adapter
is not fused (`fuse: false`), and its reference model is its own second copy of the base (it has
no adapter-off reference), which is part of what is compared.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlxft  # noqa: F401  (OpenBLAS before mlx)

from mlxft.files import write_atomic
from mlxft.models.load import resolve_model

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ("Extract the meeting request as JSON with the keys name, company, date (YYYY-MM-DD), time (HH:MM, "
          "24-hour), duration_minutes, topic and urgent (true or false). Reply with only the JSON object.")
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
SETTINGS = dict(batch_size=2, group_size=4, max_completion_length=64, temperature=0.9, beta=0.04, epsilon=0.2,
                learning_rate=1e-4, num_layers=16, rank=8, alpha=16.0)

PEER_WRAPPER = r"""
import sys
import mlxft  # OpenBLAS before mlx, as for mlxft
import mlx.core as mx
_info = mx.device_info
mx.device_info = lambda *a, **k: {**_info(*a, **k), "max_recommended_working_set_size": 1 << 34}
mx.set_wired_limit = lambda *a, **k: 0
from mlx_lm_lora.trainer.grpo_reward_functions import register_reward_function
from mlxft.evaluation.scorers import Example, make_scorer
from pathlib import Path
_schema = make_scorer("json_schema", {"schema": sys.argv.pop(1)}, Path("."))

@register_reward_function("schema_valid")
def schema_valid(prompts, completions, answer, types=None):
    return [float(v) for v in _schema.score(list(completions), [Example([], a) for a in answer]).per_example]

from mlx_lm_lora.train import main
main()
"""


def prepare(tmp: Path, n: int) -> tuple[Path, Path]:
    """The same prompts for both tools: mlxft's prompt rows and mlx-lm-lora's GRPO rows."""
    rows = [json.loads(line) for line in (ROOT / "datasets/structured/train.jsonl").read_text().splitlines()[:n + 4]]
    ours, peer = tmp / "mlxft-data", tmp / "peer-data"
    ours.mkdir(), peer.mkdir()
    for split, part in (("train", rows[:n]), ("valid", rows[n:n + 2]), ("test", rows[n + 2:])):
        user = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in part]
        answer = [r["messages"][-1]["content"] for r in part]
        (ours / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": u, "reference": a}) + "\n"
                                                     for u, a in zip(user, answer)))
        (peer / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": u, "answer": a, "system": SYSTEM}) + "\n"
                                                     for u, a in zip(user, answer)))
    return ours, peer


def run_mlxft(model: Path, data: Path, out: Path, iters: int) -> dict:
    s = SETTINGS
    recipe = out / "grpo-bench.yaml"
    recipe.write_text(json.dumps({
        "name": "grpo-bench", "model": {"source": str(model), "family": "llama"},
        "lora": {"targets": TARGETS, "rank": s["rank"], "alpha": s["alpha"], "num_layers": s["num_layers"]},
        "train": {"method": "grpo", "learning_rate": s["learning_rate"], "lr_schedule": "constant", "iters": iters,
                  "batch_size": s["batch_size"], "max_seq_length": 512, "val_every": 10_000, "val_batches": 1,
                  "report_every": 1, "save_every": 0},
        "grpo": {"num_generations": s["group_size"], "max_completion_length": s["max_completion_length"],
                 "temperature": s["temperature"], "beta": s["beta"], "epsilon": s["epsilon"],
                 "reward_suite": "structured-output", "rewards": ["schema_valid"]},
        "data": {"path": str(data), "system_prompt": SYSTEM}}))
    proc = subprocess.run([sys.executable, "-m", "mlxft.cli", "train", str(recipe), "--tier", "8",
                           "--runs-dir", str(out / "runs")], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"mlxft failed:\n{proc.stderr[-3000:]}")
    run = next((out / "runs").iterdir())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in rows if "train_loss" in m]
    secs = [b["elapsed_sec"] - a["elapsed_sec"] for a, b in zip(steps, steps[1:])]  # drops step 1 (warm-up)
    gen = [m["completion_length"] * s["batch_size"] * s["group_size"] for m in steps[1:]]
    return {"sec_per_step": statistics.mean(secs), "generated_tokens_per_sec": sum(gen) / sum(secs),
            "reward_last": statistics.mean(m["reward"] for m in steps[-3:]), "rewards": [m["reward"] for m in steps],
            "peak_memory_gb": max(m["peak_memory_gb"] for m in steps)}


SPEED = re.compile(r"Speed: ([\d.]+) it/s")
REWARD = re.compile(r"Total Rewards:\s+μ=([-\d.]+)")
TOKENS = re.compile(r"Avg tokens: ([\d.]+)")
MEMORY = re.compile(r"Memory: ([\d.]+)GB")


def run_peer(model: Path, data: Path, out: Path, iters: int) -> dict:
    s = SETTINGS
    config = out / "peer.yaml"
    config.write_text(json.dumps({
        "model": str(model), "train": True, "train_mode": "grpo", "train_type": "lora", "data": str(data),
        "iters": iters, "batch_size": s["batch_size"], "group_size": s["group_size"],
        "max_completion_length": s["max_completion_length"], "temperature": s["temperature"], "beta": s["beta"],
        "epsilon": s["epsilon"], "learning_rate": s["learning_rate"], "num_layers": s["num_layers"],
        "lora_parameters": {"rank": s["rank"], "scale": s["alpha"] / s["rank"], "dropout": 0.0, "keys": TARGETS},
        "reward_functions": "schema_valid", "steps_per_report": 1, "steps_per_eval": 10_000, "val_batches": 1,
        "save_every": 10_000, "max_seq_length": 512, "adapter_path": str(out / "peer-adapters"), "fuse": False,
        "optimizer": "adamw", "seed": 0}))
    wrapper = out / "peer_wrapper.py"
    wrapper.write_text(PEER_WRAPPER)
    proc = subprocess.run([sys.executable, str(wrapper), str(ROOT / "datasets/structured/schema.json"), "-c", str(config)],
                          capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    speeds, rewards = [float(x) for x in SPEED.findall(text)], [float(x) for x in REWARD.findall(text)]
    if proc.returncode or len(speeds) < 2:
        raise RuntimeError(f"mlx-lm-lora failed (exit {proc.returncode}): {text[-2000:]}")
    tokens = [float(x) for x in TOKENS.findall(text)]
    secs = [1 / v for v in speeds[1:]]
    gen = [t * s["batch_size"] * s["group_size"] for t in tokens[1:]]
    return {"sec_per_step": statistics.mean(secs), "generated_tokens_per_sec": sum(gen) / sum(secs),
            "reward_last": statistics.mean(rewards[-3:]), "rewards": rewards,
            "peak_memory_gb": max(float(x) for x in MEMORY.findall(text))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "grpo.json"))
    args = ap.parse_args()
    model = resolve_model("builtin:smollm2-135m-instruct", dequantize="fp32")
    result = {"settings": {**SETTINGS, "iters": args.iters, "prompts": args.prompts}, "rounds": [],
              "peer_note": "mlx-lm-lora 5.10.2 on mlx's CPU backend: the wrapper supplies "
                           "device_info()['max_recommended_working_set_size'] and makes set_wired_limit a no-op"}
    try:
        import mlx_lm_lora  # noqa: F401  (lazy: optional bench extra)
    except ImportError as e:
        result["peer_error"] = f"mlx-lm-lora not measured: {e} (pip install -e '.[bench]')"
    with tempfile.TemporaryDirectory(prefix="mlxft-grpo-bench-") as tmp:
        ours_data, peer_data = prepare(Path(tmp), args.prompts)
        for r in range(args.rounds):
            row = {}
            out = Path(tmp) / f"r{r}-mlxft"
            out.mkdir()
            row["mlxft"] = run_mlxft(model, ours_data, out, args.iters)
            if "peer_error" not in result:
                out = Path(tmp) / f"r{r}-peer"
                out.mkdir()
                try:
                    row["mlx-lm-lora"] = run_peer(model, peer_data, out, args.iters)
                    row["step_speed_ratio"] = row["mlx-lm-lora"]["sec_per_step"] / row["mlxft"]["sec_per_step"]
                except RuntimeError as e:
                    result["peer_error"] = str(e)
            result["rounds"].append(row)
            print(json.dumps({"round": r + 1, **{k: (v if not isinstance(v, dict) else
                                                    {kk: vv for kk, vv in v.items() if kk != "rewards"})
                                                for k, v in row.items()}}, indent=1))
    write_atomic(Path(args.out), json.dumps(result, indent=2) + "\n")
    ratios = [r["step_speed_ratio"] for r in result["rounds"] if "step_speed_ratio" in r]
    if ratios:
        print(f"GRPO: mlxft steps {statistics.mean(ratios):.2f}x as fast as mlx-lm-lora (per round: "
              + ", ".join(f"{x:.2f}x" for x in ratios) + ", target >= 2x); " + result["peer_note"])
    else:
        print(result.get("peer_error", "no peer measured"))


if __name__ == "__main__":
    main()
