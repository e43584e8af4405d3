"""One model's side of an eval: its replies (batched greedy generation) and perplexities on suites.

`mlxft eval` runs a side for the base and one for the adapter on the same prompts
(evaluate.py); `mlxft baseline` runs one per prompting setup of the base (baseline.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlxft.data.encode import Encoded, encode_rows, masked_encoding, prompt_ids, read_chat_jsonl
from mlxft.errors import MlxftError
from mlxft.evaluation.pairs import score_examples
from mlxft.evaluation.scorers import Example
from mlxft.evaluation.suites import Suite
from mlxft.inference.batch import generate_batch


def reference_encoding(tokenizer, messages: list[dict], reference: str, max_length: int) -> Encoded:
    """Ids of prompt + reference answer, supervised on the answer through its end-of-turn token."""
    start = len(prompt_ids(tokenizer, messages))
    full = list(tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": reference}],
                                              tokenize=True, add_generation_prompt=False))
    return masked_encoding(tokenizer, full, [(start, len(full))], False, max_length)


def total_nll(model, encoded: list[Encoded], batch_size: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood of the supervised tokens, and their count."""
    nll, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    for lo in range(0, len(order), batch_size):
        part = [encoded[i] for i in order[lo: lo + batch_size]]
        width = max(len(e.ids) for e in part)
        ids = mx.array([e.ids.tolist() + [0] * (width - len(e.ids)) for e in part])
        mask = mx.array([e.mask.tolist() + [False] * (width - len(e.mask)) for e in part])
        logits = model(ids[:, :-1]).astype(mx.float32)
        ce = nn.losses.cross_entropy(logits, ids[:, 1:], reduction="none") * mask[:, 1:]
        mx.eval(ce)
        nll += ce.sum().item()
        count += int(mask[:, 1:].sum().item())
    return nll, count


def perplexity_inputs(tokenizer, spec, examples: list[Example]) -> list[Encoded]:
    """What a perplexity scorer scores: its own data (text or chat rows) or the suite's references."""
    max_length = spec.scorer.max_length
    if spec.data is None:
        return [reference_encoding(tokenizer, e.messages, e.reference, max_length) for e in examples]
    rows = read_chat_jsonl(spec.data, need_role="user", allow_text=True)
    text = [r for r in rows if "text" in r]
    chat = [r for r in rows if "text" not in r]
    out = encode_rows(tokenizer, text, None, max_length) if text else []
    return out + [reference_encoding(tokenizer, *_split(r), max_length) for r in chat]


def _split(row: dict) -> tuple[list[dict], str]:
    msgs = row["messages"]
    if msgs[-1]["role"] != "assistant":
        raise MlxftError("a perplexity row needs a final assistant turn (the text scored)")
    return msgs[:-1], msgs[-1]["content"]


# ---------------------------------------------------------------- one model on the suites


@dataclass
class Side:
    """One model's outputs on one suite."""

    predictions: list[str] = field(default_factory=list)
    perplexity: dict[str, float] = field(default_factory=dict)  # scorer name -> ppl
    preference: dict[str, dict] = field(default_factory=dict)  # scorer name -> evaluation.pairs.score_pairs
    seconds: float = 0.0


@dataclass
class Prepared:
    suite: Suite
    examples: list[Example]


def run_side(model, tokenizer, prepared: list[Prepared], label: str, log) -> dict[str, Side]:
    """Generate and compute perplexities for every suite with one model."""
    out = {}
    for p in prepared:
        tic, side = time.perf_counter(), Side()
        if p.suite.generates:
            log(f"  {label}: {p.suite.name}: generating {len(p.examples)} replies ...")
            prompts = [prompt_ids(tokenizer, e.messages) for e in p.examples]
            side.predictions = generate_batch(model, tokenizer, prompts, p.suite.max_tokens, p.suite.batch_size)
        for spec in p.suite.scorers:
            if spec.scorer.kind == "perplexity":
                nll, count = total_nll(model, perplexity_inputs(tokenizer, spec, p.examples), spec.scorer.batch_size)
                side.perplexity[spec.name] = math.exp(nll / max(count, 1))
            elif spec.scorer.kind == "preference":  # chosen vs rejected log-probs (evaluation/pairs.py)
                side.preference[spec.name] = score_examples(model, tokenizer, p.examples, spec.scorer.batch_size)
        side.seconds = time.perf_counter() - tic
        out[p.suite.name] = side
    return out
