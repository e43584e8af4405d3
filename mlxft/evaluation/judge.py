"""LLM-as-judge, pairwise: is the adapter's reply better than the base's?

Every pair is judged twice, once with the base reply as "A" and once as "B", so a
judge that prefers whichever reply comes first (small models do) scores a tie, not
a win. The judge is any function from rendered prompts to verdicts "A", "B" or
"tie"; `mlx_judge` makes one from a local MLX model: it reads the verdict from the
judge's next-token log-probabilities of "A" and "B" after the rubric, so it needs
no free-text parsing and no sampling.
"""

from __future__ import annotations

from typing import Callable

import mlxft
import mlx.core as mx

from mlxft.data.encode import prompt_ids
from mlxft.evaluation.scorers import Example, Judge, Score

JudgeFn = Callable[[list[str]], list[str]]


def render_pairs(judge: Judge, examples: list[Example], base: list[str], adapter: list[str]) -> tuple[list[str], list[str]]:
    """Judge prompts in both orders: (A = base, B = adapter) and (A = adapter, B = base)."""

    def render(example: Example, a: str, b: str) -> str:
        users = [m["content"] for m in example.messages if m["role"] == "user"]
        return judge.template.render(question=users[-1] if users else "", reference=example.reference or "",
                                     response_a=a.strip(), response_b=b.strip(), rubric=judge.rubric)

    ab = [render(e, b, a) for e, b, a in zip(examples, base, adapter)]
    ba = [render(e, a, b) for e, b, a in zip(examples, base, adapter)]
    return ab, ba


def _adapter_points(verdict: str, adapter_is: str) -> float:
    if verdict == "tie":
        return 0.5
    return 1.0 if verdict == adapter_is else 0.0


def win_rate(base_first: list[str], adapter_first: list[str]) -> Score:
    """Adapter win rate from order-swapped verdicts (a tie or a split decision counts half).

    base_first[i] judged (A = base, B = adapter); adapter_first[i] judged (A = adapter, B = base).
    details: wins/ties/losses per example, how often the judge picked "A" (position bias)
    and how often its two verdicts agreed on the same reply (consistency).
    """
    if len(base_first) != len(adapter_first):
        raise ValueError("need one verdict per order for every example")
    for v in (*base_first, *adapter_first):
        if v not in ("A", "B", "tie"):
            raise ValueError(f"a verdict must be 'A', 'B' or 'tie', got {v!r}")
    per = [(_adapter_points(x, "B") + _adapter_points(y, "A")) / 2 for x, y in zip(base_first, adapter_first)]
    n = len(per)
    verdicts = [*base_first, *adapter_first]
    details = {
        "wins": sum(p == 1.0 for p in per),
        "ties": sum(p == 0.5 for p in per),
        "losses": sum(p == 0.0 for p in per),
        "first_position_rate": sum(v == "A" for v in verdicts) / len(verdicts) if verdicts else 0.0,
        "consistency": sum(p in (0.0, 1.0) for p in per) / n if n else 0.0,
    }
    return Score(sum(per) / n if n else 0.0, per, details)


def judge_pairs(judge: Judge, judge_fn: JudgeFn, examples: list[Example], base: list[str], adapter: list[str]) -> Score:
    ab, ba = render_pairs(judge, examples, base, adapter)
    verdicts = judge_fn(ab + ba)
    return win_rate(verdicts[: len(ab)], verdicts[len(ab):])


def mlx_judge(model, tokenizer, batch_size: int = 8) -> JudgeFn:
    """A judge function over a local MLX model: verdict = the likelier next token of "A" vs "B"."""

    choice = [tokenizer.encode(c, add_special_tokens=False)[0] for c in ("A", "B")]
    if choice[0] == choice[1]:
        raise ValueError("the judge's tokenizer gives 'A' and 'B' the same first token")

    def judge_fn(prompts: list[str]) -> list[str]:
        encoded = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        out: list[str] = [""] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for lo in range(0, len(order), batch_size):
            idx = order[lo: lo + batch_size]
            width = max(len(encoded[i]) for i in idx)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            batch = mx.array([encoded[i] + [pad] * (width - len(encoded[i])) for i in idx])
            logits = model(batch)  # right padding: the last real position sees no pad tokens
            last = mx.array([len(encoded[i]) - 1 for i in idx])
            picked = logits[mx.arange(len(idx)), last][:, mx.array(choice)].astype(mx.float32)
            for i, (a, b) in zip(idx, picked.tolist()):
                out[i] = "tie" if abs(a - b) < 1e-6 else ("A" if a > b else "B")
        return out

    return judge_fn
