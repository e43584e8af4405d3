"""GRPO: learn from a reward instead of demonstrations (`train.method: grpo`, a `grpo:` section).

For each prompt of a micro-batch the policy (base + adapter) samples `num_generations`
completions; each is scored by the rewards (training/rewards.py: the eval scorers themselves,
your own function, length limits); rewards become advantages relative to their group; the
adapter is updated with the clipped policy-gradient loss plus `beta` times a KL estimate to the
reference, which is the base with the adapter switched off (LoRA scale 0): no second copy of the
weights, as DPO's reference. Loss variants:

- `grpo` (Shao et al. 2024): advantage = (r - group mean) / group std; each completion's
  per-token terms averaged over its own tokens, then over completions;
- `dr_grpo` (Liu et al. 2025, "Dr. GRPO"): advantage = r - group mean (no std); per-token terms
  summed and divided by completions x max_completion_length (no length normalisation).

Per token t of completion i: -min(ratio A_i, clip(ratio, 1 - epsilon, 1 + epsilon) A_i) +
beta * (exp(ref - logp) - (ref - logp) - 1), ratio = exp(logp - logp_sampling). One optimizer step
per sampled batch, so the ratio is 1 (its gradient is the REINFORCE gradient) and the clip fraction
is 0; both are computed as the formula says and logged. Log-probs are of the model's own logits
(no temperature). Sampling draws from mx.random, whose state every checkpoint holds: a killed and
resumed run samples the same completions and ends with the bit-identical adapter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from mlx_lm.sample_utils import make_sampler

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlxft.config import Recipe
from mlxft.data.encode import prompt_ids, with_system_prompt
from mlxft.data.training_data import TrainingData
from mlxft.errors import ConfigError, DataError
from mlxft.evaluation.scorers import Example
from mlxft.inference.batch import complete
from mlxft.rank import size
from mlxft.training.batches import EpochBatches
from mlxft.training.fast.prefix import FrozenPrefixCache, array_offsets_work, grouped_hidden
from mlxft.training.loss import has_sparse_head, lm_head
from mlxft.training.objective import Objective
from mlxft.training.rewards import Rewards, build_rewards

# Warn when at least this share of groups had all-equal rewards (no learning signal) for this many steps.
FLAT_SHARE, FLAT_STEPS = 0.5, 10


@dataclass
class Prompt:
    example: Example  # the prompt messages (with the run's system prompt), its reference, the row
    ids: list[int]  # the prompt's token ids, exactly as inference builds them
    where: str


def to_prompt(row: dict, where: str, tokenizer, system: str | None) -> Prompt:
    """A chat row as a GRPO prompt: through its last user turn; a final assistant turn (or the row's
    `reference`) is the reference rewards may compare with."""
    messages = row["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    answer = [m["content"] for m in messages[last_user + 1:] if m["role"] == "assistant"]
    reference = row.get("reference", answer[-1] if answer else None)
    prompt = with_system_prompt(messages[: last_user + 1], system)
    return Prompt(Example(prompt, reference, row), prompt_ids(tokenizer, prompt), where)


def group_advantages(rewards: np.ndarray, group: int, loss: str = "grpo") -> np.ndarray:
    """Advantages of rewards laid out group by group (`group` completions per prompt)."""
    r = rewards.reshape(-1, group)
    centred = r - r.mean(axis=1, keepdims=True)
    if loss == "grpo":
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + 1e-4)
    return centred.reshape(-1)


def token_logps(model, inputs: mx.array, targets: mx.array, idx: mx.array, sparse: bool) -> mx.array:
    """Log-probabilities of `targets` at the flat positions `idx` (the completions' tokens)."""
    if sparse:
        h = model.model(inputs)
        logits = lm_head(model, h.reshape(-1, h.shape[-1])[idx])
    else:
        logits = model(inputs)
        logits = logits.reshape(-1, logits.shape[-1])[idx]
    return -nn.losses.cross_entropy(logits.astype(mx.float32), targets.reshape(-1)[idx])


@dataclass
class Rollout:
    """A sampled batch as model inputs: G completions per prompt, their prompts shared (`prefixes`,
    one per prompt: computed once per group) or in full rows; the completion tokens are the targets."""

    inputs: mx.array  # (rows, S): completion rows after their prompt head, or whole rows
    targets: mx.array
    idx: mx.array  # flat positions of completion tokens
    seq: mx.array  # each of those tokens' completion
    adv: mx.array  # each of those tokens' advantage
    n_seq: int
    prefixes: list | None = None  # per prompt: FrozenPrefixCache entry (shared-prefix forward)
    row_group: mx.array | None = None
    offsets: mx.array | None = None


def rollout_logps(model, r: Rollout, first: int, sparse: bool) -> mx.array:
    """Log-probabilities of the completion tokens, through the grouped shared-prefix forward when
    the rollout has prefixes (the same values as full rows, fp rounding aside)."""
    if r.prefixes is None:
        return token_logps(model, r.inputs, r.targets, r.idx, sparse)
    h = grouped_hidden(model, first, r.prefixes, r.row_group, r.offsets, r.inputs)
    logits = lm_head(model, h.reshape(-1, h.shape[-1])[r.idx])
    return -nn.losses.cross_entropy(logits.astype(mx.float32), r.targets.reshape(-1)[r.idx])


def grpo_loss(logp: mx.array, old: mx.array, ref: mx.array, adv: mx.array, seq: mx.array, n_seq: int,
              epsilon: float, beta: float, loss: str, max_len: int) -> tuple[mx.array, dict]:
    """The clipped policy-gradient loss plus beta x KL over completion tokens (flat arrays; `adv`
    per token, `seq` each token's completion index)."""
    ratio = mx.exp(logp - old)
    clipped = mx.clip(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -mx.minimum(ratio * adv, clipped * adv)
    delta = ref - logp
    kl = mx.exp(delta) - delta - 1
    per_token = per_token + beta * kl
    onehot = (seq[None, :] == mx.arange(n_seq)[:, None]).astype(mx.float32)  # (completions, tokens)
    per_seq = onehot @ per_token
    lengths = mx.maximum(onehot.sum(axis=1), 1)
    value = (per_seq / lengths).mean() if loss == "grpo" else per_seq.sum() / (n_seq * max_len)
    stats = {"kl": ((onehot @ kl) / lengths).mean(),
             "clip_fraction": ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).astype(mx.float32).mean()}
    return value, stats


class adapters_off:
    """Within the block the LoRA layers add nothing (scale 0): the model is its base, the reference."""

    def __init__(self, model):
        self.layers = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]

    def __enter__(self):
        self.scales = [m.scale for m in self.layers]
        for m in self.layers:
            m.scale = 0.0

    def __exit__(self, *exc):
        for m, s in zip(self.layers, self.scales):
            m.scale = s


class GRPO(Objective):
    """Group-relative policy optimisation on prompts, with the recipe's rewards."""

    name, unit = "grpo", "prompts"

    def __init__(self, recipe: Recipe, train_set: list[Prompt], valid_set: list[Prompt], rewards: Rewards,
                 tokenizer):
        self.recipe, self.cfg, self.tokenizer = recipe, recipe.grpo, tokenizer
        self.train_set, self.valid_set, self.rewards = train_set, valid_set, rewards
        self.batches = EpochBatches(train_set, recipe.train, length=lambda q: len(q.ids))
        self.stats = {"reward": ("reward", ".2f"), "reward_std": ("std", ".2f"), "kl": ("kl", ".3f"),
                      "completion_length": ("len", ".0f"), "no_signal": ("flat", ".2f")}
        self.log, self.flat_steps, self._counts = print, 0, (0, 0)

    @classmethod
    def from_data(cls, recipe: Recipe, data: TrainingData) -> "GRPO":
        cfg, t = recipe.grpo, recipe.train
        if size() > 1:
            raise ConfigError("GRPO runs in one process (its sampling is not split across ranks yet); drop --hosts")
        if cfg.beta > 0 and recipe.fine_tune_type != "lora":
            raise ConfigError(f"GRPO's KL reference is the base with the LoRA adapter switched off; with "
                              f"fine_tune_type={recipe.fine_tune_type} there is none: use lora, or grpo.beta=0")
        rewards = build_rewards(cfg)
        system = recipe.data.system_prompt
        split = {s: [to_prompt(e.row, e.where, data.tokenizer, system) for e in data.examples(s)] for s in ("train", "valid")}
        if len(split["train"]) < t.batch_size:
            raise DataError(f"{data.path}/train.jsonl has {len(split['train'])} prompts, fewer than batch_size={t.batch_size}")
        if rewards.needs_reference:
            missing = [q.where for s in split.values() for q in s if q.example.reference is None]
            if missing:
                raise DataError(f"{missing[0]}: a reward compares with a reference, and this prompt has none "
                                f"({len(missing)} such rows; give `reference` or a final assistant turn)")
        return cls(recipe, split["train"], split["valid"], rewards, data.tokenizer)

    def before_adapters(self, model, log):
        self.log = log

    def attach(self, model, paths):
        self.sparse = has_sparse_head(model, self.recipe.model.family)
        # A group's completions share their prompt: run it once per group (fast/prefix.py), chosen once here.
        self.frozen = FrozenPrefixCache(model) if paths.shared_prefix and array_offsets_work(model) else None
        self._value_and_grad = nn.value_and_grad(model, self._loss)

    def counts(self, items):
        return self._counts  # of the batch just sampled: prompt + completion tokens, completion tokens

    def sample(self, model, items: list[Prompt]) -> tuple[list, np.ndarray, dict]:
        """G completions per prompt (batched, each prompt's head computed once), their total rewards
        and the statistics of the rewards."""
        g = self.cfg.num_generations
        model.eval()
        sampler = make_sampler(self.cfg.temperature, self.cfg.top_p if self.cfg.top_p < 1 else 0.0)
        done = complete(model, self.tokenizer, [q.ids for q in items for _ in range(g)],
                        self.cfg.max_completion_length, len(items) * g, sampler=sampler)
        model.train()
        examples = [q.example for q in items for _ in range(g)]
        errors = self.rewards.errors()
        totals, per = self.rewards([c.text for c in done], examples)
        r = np.array(totals, dtype=np.float64)
        flat = float((r.reshape(-1, g).std(axis=1) == 0).mean())
        stats = {"reward": r.mean(), "reward_std": r.reshape(-1, g).std(axis=1, ddof=1).mean(), "no_signal": flat,
                 "reward_errors": self.rewards.errors() - errors,
                 **{f"reward/{k}": float(np.mean(v)) for k, v in per.items()}}
        return done, r, stats

    def loss_and_grad(self, model, items, batch):
        done, rewards, stats = self.sample(model, items)
        rollout = self.rollout(items, done, group_advantages(rewards, self.cfg.num_generations, self.cfg.loss))
        ref = mx.zeros(rollout.idx.shape)
        if self.cfg.beta > 0:
            with adapters_off(model):
                ref = mx.stop_gradient(self.logps(model, rollout))
        (loss, loss_stats), grads = self._value_and_grad(model, rollout, ref)
        self._warn_if_flat(stats["no_signal"])
        stats = {**stats, "completion_length": np.mean([len(c.token_ids) for c in done])}
        return loss, grads, {**{k: mx.array(float(v)) for k, v in stats.items()}, **loss_stats}

    def rollout(self, items: list[Prompt], done: list, adv: np.ndarray) -> Rollout:
        """The sampled completions as inputs: after their prompt's head (shared-prefix forward) or whole."""
        g = self.cfg.num_generations
        prompts = [q.ids for q in items for _ in range(g)]
        heads = [len(p) - 1 if self.frozen is not None else 0 for p in prompts]  # the last prompt token predicts
        seqs = [p + c.token_ids for p, c in zip(prompts, done)]
        width = max(len(s) - 1 - k for s, k in zip(seqs, heads))
        inputs = np.zeros((len(seqs), width), np.int32)
        targets = np.zeros((len(seqs), width), np.int32)
        idx, seq, per_adv = [], [], []
        for i, (s, p, k) in enumerate(zip(seqs, prompts, heads)):
            inputs[i, : len(s) - 1 - k], targets[i, : len(s) - 1 - k] = s[k:-1], s[k + 1:]
            positions = range(len(p) - 1 - k, len(s) - 1 - k)  # where the completion's tokens are the targets
            idx += [i * width + j for j in positions]
            seq += [i] * len(positions)
            per_adv += [adv[i]] * len(positions)
        self._counts = (sum(len(s) - 1 for s in seqs), len(idx))
        arrays = dict(inputs=mx.array(inputs), targets=mx.array(targets), idx=mx.array(np.array(idx, np.int32)),
                      seq=mx.array(np.array(seq, np.int32)), adv=mx.array(np.array(per_adv, np.float32)), n_seq=len(seqs))
        if self.frozen is None:
            return Rollout(**arrays)
        prefixes = [self.frozen.get(mx.array(np.array(q.ids[:-1], np.int32))[None]) for q in items]
        return Rollout(**arrays, prefixes=prefixes, row_group=mx.array(np.repeat(np.arange(len(items)), g).astype(np.int32)),
                       offsets=mx.array(np.array(heads, np.int32)))

    def logps(self, model, rollout: Rollout) -> mx.array:
        return rollout_logps(model, rollout, self.frozen.first if self.frozen is not None else 0, self.sparse)

    def _loss(self, model, rollout, ref):
        logp = self.logps(model, rollout)
        old = mx.stop_gradient(logp)  # the sampling policy: this very adapter (one step per sampled batch)
        return grpo_loss(logp, old, ref, rollout.adv, rollout.seq, rollout.n_seq, self.cfg.epsilon, self.cfg.beta,
                         self.cfg.loss, self.cfg.max_completion_length)

    def _warn_if_flat(self, share: float) -> None:
        self.flat_steps = self.flat_steps + 1 if share >= FLAT_SHARE else 0
        if self.flat_steps == FLAT_STEPS:
            self.log(f"\nwarning: for {FLAT_STEPS} steps at least {FLAT_SHARE:.0%} of prompt groups got the same reward "
                     "for every completion, which teaches nothing. Raise grpo.temperature or grpo.num_generations, "
                     "use graded rewards (fields_correct, max_words=N) beside all-or-nothing ones, or start from an "
                     "SFT adapter so that some completions succeed")

    def validation_sums(self, model, items, batch_size):
        """Greedy replies to the validation prompts, rewarded: "loss" is minus the mean reward, so the
        best adapter and early stopping follow the validation reward."""
        done = complete(model, self.tokenizer, [q.ids for q in items], self.cfg.max_completion_length, batch_size)
        totals, per = self.rewards([c.text for c in done], [q.example for q in items])
        sums = {"loss": -sum(totals), "reward": sum(totals), **{f"reward/{k}": sum(v) for k, v in per.items()}}
        return sums, len(items)

    def describe(self, stats, prefix=""):
        if "reward" not in stats:
            return ""
        parts = ", ".join(f"{k[7:]} {v:.2f}" for k, v in stats.items() if k.startswith("reward/"))
        return f", {prefix}reward {stats['reward']:.3f}" + (f" ({parts})" if parts else "")

    def describe_data(self):
        return {"rows": {"train": len(self.train_set), "valid": len(self.valid_set)},
                "supervised_tokens": {"train": 0}}  # GRPO learns from its own completions

    def config_sections(self):
        return {"grpo": {**dataclasses.asdict(self.cfg),
                         "rewards_used": [{"name": r.name, "weight": r.weight} for r in self.rewards.rewards],
                         "reference": "the base model with the LoRA adapter switched off (scale 0)"}}

