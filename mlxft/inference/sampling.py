"""Sampling made visible: `mlxft generate --show-probs K` prints, at each step, the top-K
next tokens before and after temperature / top-p / min-p / top-k, then the token drawn.

The "after" distribution is computed with mlx-lm's own filters in make_sampler's order
(top-p, min-p, top-k on the model's log-probabilities, then temperature:
softmax(logprobs / temp) over what is left), so what is shown is exactly what
mlx_lm.sample_utils samples from.
"""

from __future__ import annotations

import sys

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from mlxft.data.encode import prompt_ids
from mlxft.inference.generate import Loaded, Sampling


def processed_probs(logprobs: mx.array, temp: float, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """The distribution make_sampler(temp, top_p, min_p, top_k=top_k) draws from, renormalised.

    logprobs: (V,) or (1, V) log-softmax of the logits. temp 0 is greedy: all mass on the argmax.
    """

    x = logprobs.reshape(1, -1).astype(mx.float32)
    if temp == 0:
        return (mx.arange(x.shape[-1]) == mx.argmax(x, axis=-1)).astype(mx.float32)
    if 0 < top_p < 1.0:
        x = apply_top_p(x, top_p)
    if min_p != 0.0:
        x = apply_min_p(x, min_p)
    if 0 < top_k < x.shape[-1]:
        x = apply_top_k(x, top_k)
    return mx.softmax(x / temp, axis=-1)[0]  # temperature divides the logits before the softmax


def describe(sampling: Sampling) -> str:
    if sampling.temp == 0:
        return "greedy (temp 0): all probability on the most likely token"
    parts = [f"temp {sampling.temp:g}"]
    if 0 < sampling.top_p < 1:
        parts.append(f"top-p {sampling.top_p:g}")
    if sampling.min_p:
        parts.append(f"min-p {sampling.min_p:g}")
    if sampling.top_k:
        parts.append(f"top-k {sampling.top_k}")
    return ", ".join(parts) + ", renormalised"


def next_token_steps(model, tokenizer, ids: list[int], sampling: Sampling, k: int):
    """Generate from prompt `ids`, yielding each step's top-k next tokens before/after the sampling settings.

    Each step is {"step", "token", "text", "top": [{"id", "text", "raw", "used"}]}; the drawn
    token is listed in "top" even when it is not among the k most likely. `mlxft generate
    --show-probs` prints these; the studio's playground shows them as a table.
    """

    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(sampling.temp, sampling.top_p, sampling.min_p, top_k=sampling.top_k)
    for step, (token, logprobs) in enumerate(generate_step(mx.array(ids), model, max_tokens=sampling.max_tokens,
                                                           sampler=sampler), 1):
        token = int(token)
        raw = mx.exp(logprobs.reshape(-1).astype(mx.float32))
        used = processed_probs(logprobs, sampling.temp, sampling.top_p, sampling.top_k, sampling.min_p)
        top = mx.argsort(-raw)[:k].tolist()
        shown = top + ([token] if token not in top else [])
        yield {"step": step, "token": token, "text": tokenizer.decode([token]), "eos": token in tokenizer.eos_token_ids,
               "top": [{"id": t, "text": tokenizer.decode([t]), "raw": raw[t].item(), "used": used[t].item()}
                       for t in shown]}


def show_probs(loaded: Loaded, prompt: str, system: str | None, sampling: Sampling, k: int, out=None) -> str:
    """Generate like `generate`, printing each step's top-k tokens before/after sampling settings."""
    out = out or sys.stdout  # looked up per call so that redirected/captured stdout is honoured
    tok = loaded.tokenizer
    ids = prompt_ids(tok, [{"role": "user", "content": prompt}], system)
    out.write(f"p(raw) = softmax(logits); p(used) = after {describe(sampling)}\n")
    generated: list[int] = []
    for s in next_token_steps(loaded.model, tok, ids, sampling, k):
        out.write(f"step {s['step']}\n   {'id':>6} {'token':<16} {'p(raw)':>8} {'p(used)':>8}\n")
        for t in s["top"]:
            mark = "  <- sampled" if t["id"] == s["token"] else ""
            out.write(f"   {t['id']:>6} {t['text']!r:<16} {t['raw']:8.4f} {t['used']:8.4f}{mark}\n")
        if s["eos"]:
            break
        generated.append(s["token"])
    text = tok.decode(generated)
    out.write(f"answer: {text}\n")
    return text
