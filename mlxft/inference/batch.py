"""Many completions at once, with the KV cache: what eval, baseline and GRPO generate with.

Built on mlx-lm's BatchGenerator (one batched decode over all prompts, each with its own KV
cache). A prompt head shared by several prompts runs through the model once and every prompt
starts from a copy of its cache: the chat template + system prompt of an eval suite, or the whole
prompt of a GRPO group (its G samples differ only in what is sampled after it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, make_prompt_cache

MIN_SHARED = 8  # below this many shared tokens a prefill of its own is not worth a cache copy


@dataclass
class Completion:
    text: str
    token_ids: list[int]  # the generated tokens, the end-of-turn token included when it stopped there
    finished: bool  # stopped at an end-of-turn token (not cut at max_tokens)


def generate_batch(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch_size: int = 32,
                   share_prefix: bool = True) -> list[str]:
    """Greedy completions for many prompts at once.

    Eval prompts usually share a long head (chat template + system prompt). With `share_prefix`
    that head is run through the model once and every prompt starts from a copy of its KV cache,
    which halves the work on the commit-type suite.
    """
    return [c.text for c in complete(model, tokenizer, prompts, max_tokens, batch_size, share_prefix)]


def complete(model, tokenizer, prompts: list[list[int]], max_tokens: int, batch_size: int = 32,
             share_prefix: bool = True, sampler: Callable | None = None) -> list[Completion]:
    """Completions of `prompts` (greedy, or drawn with `sampler`), in the prompts' order.

    Identical prompts (a GRPO group) share their whole head; otherwise all prompts share their
    common head. Sampling draws from mx.random, so a seeded run draws the same completions."""
    if not prompts:
        return []
    heads = _heads(prompts) if share_prefix else {}
    caches = _prefill(model, heads) if heads else None
    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], sampler=sampler,
                         completion_batch_size=batch_size, prefill_batch_size=batch_size)
    try:
        if caches is None:
            uids = gen.insert(prompts, [max_tokens] * len(prompts))
        else:
            rest = [p[len(heads[i]):] for i, p in enumerate(prompts)]
            uids = gen.insert(rest, [max_tokens] * len(prompts), caches=[_copy(caches[heads[i]]) for i in range(len(prompts))])
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        finished: dict[int, bool] = {}
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(int(r.token))  # the stop token too: a completion learns to end
                if r.finish_reason is not None:
                    finished[r.uid] = r.finish_reason == "stop"
    finally:
        gen.close()
    out = []
    for uid in uids:
        done = finished.get(uid, False)
        shown = tokens[uid][:-1] if done else tokens[uid]
        out.append(Completion(tokenizer.decode(shown), tokens[uid], done))
    return out


def _heads(prompts: list[list[int]]) -> dict[int, tuple[int, ...]]:
    """Prompt index -> the head it shares: its whole prompt but the last token when it repeats,
    else the common head of all prompts; {} when nothing worth sharing."""
    counts: dict[tuple[int, ...], int] = {}
    for p in prompts:
        counts[tuple(p)] = counts.get(tuple(p), 0) + 1
    if any(n > 1 for n in counts.values()):
        heads = {i: tuple(p[:-1]) for i, p in enumerate(prompts)}
    else:
        shared = len(os.path.commonprefix(prompts)) - 1  # keep at least one token per prompt to prefill
        heads = {i: tuple(p[:shared]) for i, p in enumerate(prompts)}
    return heads if min(len(h) for h in heads.values()) >= MIN_SHARED else {}


def _prefill(model, heads: dict[int, tuple[int, ...]]) -> dict[tuple[int, ...], list] | None:
    """One KV cache per distinct head, or None where the model's caches cannot be copied this way."""
    out = {}
    for head in dict.fromkeys(heads.values()):
        cache = make_prompt_cache(model)
        if not all(type(c) is KVCache for c in cache):
            return None
        model(mx.array(head)[None], cache=cache)
        mx.eval([c.state for c in cache])
        out[head] = cache
    return out


def _copy(cache: list) -> list:
    out = []
    for c in cache:
        fresh = KVCache()
        fresh.state = c.state  # the generator merges caches into new arrays; these stay untouched
        out.append(fresh)
    return out
