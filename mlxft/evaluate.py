"""Base vs adapter on held-out data: exact-match accuracy with batched greedy generation.

`compare_run` loads the base once, scores it, attaches the run's adapters to the
same weights, and scores again on the same prompts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlxft  # noqa: F401
import mlx.core as mx

from mlxft.data import prompt_ids, read_chat_jsonl
from mlxft.runs import RunDir, write_atomic


def normalize_label(text: str) -> str:
    """Exact match after trimming whitespace and a trailing period; case kept."""
    return text.strip().rstrip(".").strip()


@dataclass
class ExactMatch:
    accuracy: float
    n: int
    predictions: list[str]
    references: list[str]
    seconds: float


def reference_and_prompt(tokenizer, row: dict, system_prompt: str | None) -> tuple[list[int], str]:
    """Prompt = the conversation up to its last assistant turn; reference = that turn."""
    msgs = row["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return prompt_ids(tokenizer, msgs[:last], system_prompt), msgs[last]["content"]


def generate_batch(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions for many prompts at once (mlx-lm's BatchGenerator)."""
    from mlx_lm.generate import batch_generate

    out = batch_generate(
        model, tokenizer, prompts, max_tokens=max_tokens, completion_batch_size=batch_size, prefill_batch_size=batch_size
    )
    return list(out.texts)


def exact_match(model, tokenizer, rows: list[dict], system_prompt: str | None, max_tokens: int = 8) -> ExactMatch:
    tic = time.perf_counter()
    pairs = [reference_and_prompt(tokenizer, r, system_prompt) for r in rows]
    preds = generate_batch(model, tokenizer, [p for p, _ in pairs], max_tokens)
    refs = [r for _, r in pairs]
    correct = sum(normalize_label(p) == normalize_label(r) for p, r in zip(preds, refs))
    return ExactMatch(correct / max(len(rows), 1), len(rows), preds, refs, time.perf_counter() - tic)


def compare_run(run_path: str | Path, split: str = "test", log=print) -> dict:
    """Score base and adapter on the run's `split`; write eval.json in the run folder."""
    from mlx_lm.tuner.utils import load_adapters

    from mlxft.models import load_run_base

    run = RunDir.open(run_path)
    cfg = run.read_config()
    recipe = cfg["recipe"]
    rows = read_chat_jsonl(Path(cfg["data"]["path"]) / f"{split}.jsonl")
    base = load_run_base(cfg)
    system = cfg.get("system_prompt")
    max_tokens = recipe.get("eval", {}).get("max_tokens", 8)
    log(f"scoring the base model on {len(rows)} {split} rows ...")
    base_em = exact_match(base.model, base.tokenizer, rows, system, max_tokens)
    load_adapters(base.model, str(run.best_adapters))
    base.model.eval()
    log(f"scoring the adapter on the same {len(rows)} prompts ...")
    tuned_em = exact_match(base.model, base.tokenizer, rows, system, max_tokens)
    result = {
        "split": split,
        "n": len(rows),
        "scorer": "exact_match",
        "base": base_em.accuracy,
        "adapter": tuned_em.accuracy,
        "delta": tuned_em.accuracy - base_em.accuracy,
        "seconds": {"base": base_em.seconds, "adapter": tuned_em.seconds},
        "examples": [
            {"reference": r, "base": b, "adapter": a}
            for r, b, a in list(zip(base_em.references, base_em.predictions, tuned_em.predictions))[:20]
        ],
    }
    write_atomic(run.eval_json, json.dumps(result, indent=2) + "\n")
    return result


def format_comparison(result: dict) -> str:
    pct = lambda x: f"{100 * x:5.1f}%"  # noqa: E731
    lines = [
        f"exact match on {result['split']} ({result['n']} rows, greedy, same prompts):",
        f"  base     {pct(result['base'])}",
        f"  adapter  {pct(result['adapter'])}",
        f"  delta    {100 * result['delta']:+5.1f} points",
    ]
    return "\n".join(lines)
