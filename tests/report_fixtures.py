"""Fabricated run folders (config.json + metrics.jsonl + eval.json) for report and `mlxft runs` tests.

They follow what mlxft/training/setup.py writes and the eval.json contract (version 2), so layout tests
run in milliseconds; tests/runs/test_report.py also reports on one real tiny training run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"


def make_config(name: str = "tiny", lr: float = 1e-3, steps: int = 40, finished: bool = True) -> dict:
    cfg = {
        "recipe": {
            "name": name,
            "fine_tune_type": "lora",
            "model": {"source": "builtin:smollm2-135m-instruct", "family": "llama"},
            "lora": {"rank": 8, "alpha": 16, "num_layers": 16, "targets": ["self_attn.q_proj"]},
            "train": {"learning_rate": lr, "iters": steps, "batch_size": 4, "grad_accumulation": 1, "seed": 1234,
                      "lr_schedule": "cosine"},
            "data": {"path": "datasets/commit-type", "system_prompt": "Label the commit."},
        },
        "data": {"path": "/data/commit-type", "sha256": {"train": "a" * 64, "valid": "b" * 64},
                 "rows": {"train": 900, "valid": 120}},
        "base_model": {"source": "builtin:smollm2-135m-instruct", "path": "/cache/smollm2", "precision": "float32"},
        "chat_template": CHAT_TEMPLATE,
        "chat_template_sha256": "c" * 64,
        "default_chat_template": False,
        "system_prompt": "Label the commit.",
        "trainable_parameters": 1_200_000,
        "total_parameters": 135_000_000,
        "steps": steps,
        "versions": {"python": "3.11.7", "mlxft": "0.1.0", "mlx": "0.32.4", "mlx-lm": "0.32.2"},
        "machine": {"platform": "Linux-test", "processor": "x86_64", "device": "Device(cpu, 0)",
                    "chip": "Test CPU 9000", "cpu_count": 2, "memory_gb": 24.0},
        "started": "2026-11-23T12:00:00",
    }
    if finished:
        cfg["finished"] = "2026-11-23T12:10:00"
    return cfg


def make_metrics(steps: int = 40, overfit: bool = True, preference: bool = False, report_every: int = 5) -> list[dict]:
    """Train loss falls throughout; validation falls, then (overfit=True) rises over the last three checks."""
    lines = []
    for step in range(report_every, steps + 1, report_every):
        rec = {"step": step, "train_loss": 3.0 * 0.93**step, "learning_rate": 1e-3, "tokens": 400 * step,
               "supervised_tokens": 20 * step, "tokens_per_sec": 200.0 + step, "supervised_tokens_per_sec": 7.0,
               "peak_memory_gb": 1.2 + step / 1000, "elapsed_sec": step * 2.0}
        if preference:
            rec.update(reward_margin=0.05 * step, preference_accuracy=min(1.0, 0.5 + step / 80),
                       chosen_logp=-20 + step / 10, rejected_logp=-20 - step / 10)
        lines.append(rec)
        if step % 10 == 0:
            k = step // 10
            val = 2.5 - 0.4 * k if (not overfit or k <= 1) else 2.1 + 0.3 * (k - 1)
            lines.append({"step": step, "val_loss": val})
            if preference:
                lines[-1].update(val_reward_margin=0.04 * step, val_preference_accuracy=min(1.0, 0.45 + step / 80))
    if overfit:
        lines.append({"step": steps, "event": "overfitting", "val_losses": [2.1, 2.4, 2.7, 3.0]})
    return lines


def make_eval(passed: bool = True) -> dict:
    return {
        "version": 2,
        "run": "runs/tiny",
        "base_model": "builtin:smollm2-135m-instruct",
        "adapter": "runs/tiny/adapters/best",
        "created": "2026-11-23T12:20:00Z",
        "passed": passed,
        "suites": {
            "commit-type": {
                "description": "Conventional-commit type of a commit message",
                "data": "datasets/commit-type/test.jsonl",
                "n": 160,
                "seconds": {"base": 51.2, "adapter": 50.8},
                "passed": True,
                "prompt": {"system": "default", "few_shot": 0, "max_tokens": 8},
                "scorers": [
                    {"name": "exact_match", "higher_is_better": True, "unit": "fraction",
                     "values": {"base": 0.0, "adapter": 0.862, "base 3-shot": 0.31}, "delta": 0.862,
                     "gate": {"rule": "adapter >= 0.7", "passed": True},
                     "details": {"confusion": {"labels": ["feat", "fix"], "columns": ["feat", "fix", "(other)"],
                                               "base": [[0, 1, 2], [1, 0, 0]], "adapter": [[3, 0, 0], [0, 1, 0]]}}},
                ],
                "failures": [
                    {"prompt": "add <script>alert(1)</script> guard", "reference": "fix", "base": "This commit fixes",
                     "adapter": "feat", "scorer": "exact_match"},
                ],
            },
            "regression": {
                "description": "General ability: perplexity on held-out text",
                "passed": passed,
                "n": 40,
                "scorers": [
                    {"name": "perplexity", "higher_is_better": False, "unit": "ppl",
                     "values": {"base": 12.0, "adapter": 13.5}, "delta": 1.5,
                     "gate": {"rule": "adapter <= base * 1.10", "passed": passed}, "details": {}},
                ],
                "failures": [],
            },
        },
    }


def write_run(root: Path, name: str, *, config: dict | None = None, metrics: list[dict] | None = None,
              eval_json: dict | None = None, checkpoint_step: int | None = None, stop_reason: str | None = None,
              age_seconds: float = 3600) -> Path:
    """A run folder as mlxft train leaves it; metrics.jsonl is back-dated so it does not look 'running'."""
    run = root / name
    (run / "adapters").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config if config is not None else make_config()))
    if metrics is not None:
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        old = time.time() - age_seconds
        os.utime(run / "metrics.jsonl", (old, old))
    if eval_json is not None:
        (run / "eval.json").write_text(json.dumps(eval_json))
    if checkpoint_step is not None:
        ck = run / "checkpoints" / f"step-{checkpoint_step:06d}"
        ck.mkdir(parents=True)
        (ck / "state.json").write_text(json.dumps({"step": checkpoint_step, "stop_reason": stop_reason}))
    return run
