"""Preference tuning: DPO and ORPO on (prompt, chosen, rejected) pairs, as an objective of the loop.

Run it as `mlxft train RECIPE --method dpo|orpo` (or `train.method:` in the recipe);
`mlxft train --resume RUN` continues a stopped run as for SFT, and `--hosts` runs it data-parallel.

- DPO (Rafailov et al. 2023) raises the policy's log-prob ratio to a reference model on
  the chosen answer over the rejected one. The reference is the frozen base itself: its
  log-probs of every pair are computed once, before the adapters are attached, so no
  second copy of the weights is ever held (and DoRA / full fine-tunes work the same way).
  Loss variants: `sigmoid` (with optional label smoothing) and `ipo` (Azar et al. 2023).
- ORPO (Hong et al. 2024) needs no reference: one stage of SFT loss on the chosen answer
  plus `orpo_lambda` times the odds-ratio loss between chosen and rejected.

Only the answer (the turns after the prompt's last user message) is scored; the prompt is
context (mlxft/data/pairs.py). Logged per step (progress bar and RUN/metrics.jsonl): loss,
reward_margin, preference_accuracy, chosen_logp and rejected_logp (summed log-prob of each answer).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm import tqdm

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from mlxft.config import PreferenceConfig, Recipe
from mlxft.data.encode import Encoded, pad_rows
from mlxft.data.pairs import Pair, encode_pairs, require_pairs
from mlxft.data.training_data import TrainingData
from mlxft.errors import DataError, MlxftError
from mlxft.training.adapters import total_steps
from mlxft.training.batches import EpochBatches
from mlxft.training.loss import has_sparse_head, lm_head
from mlxft.training.objective import Objective

PREFERENCE_METHODS = ("dpo", "orpo")


@dataclass
class Padded:
    """Rows right-padded to their longest, with the flat supervised positions and which row each is in."""

    inputs: mx.array  # (R, T)
    targets: mx.array
    idx: mx.array  # flat supervised positions
    segments: mx.array  # (R, n_supervised) one-hot: row of each supervised position


@dataclass
class PairBatch:
    # Chosen and rejected rows are padded apart: a rambling rejected answer is often several
    # times longer than the chosen one, and one shared padding would spend most compute on pads.
    chosen: Padded
    rejected: Padded
    lengths: mx.array  # (2B,) supervised tokens per row: chosen rows, then rejected rows
    ref: mx.array  # (2B,) reference log-probs (NaN when unused)
    n_tokens: int
    n_supervised: int
    # ORPO's SFT term divides by the chosen answers' tokens of the whole batch; on one of N
    # data-parallel ranks, by this rank's pair share of the global batch's (so the ranks' losses
    # average to the one-process loss). None: this batch's own.
    chosen_tokens: float | None = None


def pad_side(rows: list[Encoded]) -> tuple[Padded, np.ndarray]:
    """One side's rows (all chosen or all rejected) right-padded, and each row's supervised tokens."""
    inputs, targets, mask = pad_rows(rows)
    T = mask.shape[1]
    idx = np.flatnonzero(mask)
    segments = np.zeros((len(rows), len(idx)), dtype=np.float32)
    segments[idx // T, np.arange(len(idx))] = 1.0
    padded = Padded(mx.array(inputs), mx.array(targets), mx.array(idx.astype(np.int32)), mx.array(segments))
    return padded, mask.sum(1)


def collate_pairs(pairs: list[Pair]) -> PairBatch:
    """The chosen rows and the rejected rows of a batch, each padded to its own longest row."""
    chosen, n_chosen = pad_side([p.chosen for p in pairs])
    rejected, n_rejected = pad_side([p.rejected for p in pairs])
    lengths = np.concatenate([n_chosen, n_rejected]).astype(np.float32)
    ref = np.array([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=np.float32)
    n_tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) - 2 for p in pairs)
    return PairBatch(chosen, rejected, mx.array(lengths), mx.array(ref), n_tokens, int(lengths.sum()))


def make_logps(model: nn.Module, family: str) -> Callable:
    """fn(model, batch) -> (2B,) summed log-probs of each row's supervised tokens (chosen, then rejected).

    As in SFT, the lm-head runs only at supervised positions where the family allows it.
    """
    sparse = has_sparse_head(model, family)

    def side(m, b: Padded) -> mx.array:
        if sparse:
            h = m.model(b.inputs)
            logits = lm_head(m, h.reshape(-1, h.shape[-1])[b.idx])
        else:
            logits = m(b.inputs)
            logits = logits.reshape(-1, logits.shape[-1])[b.idx]
        token_logp = -nn.losses.cross_entropy(logits.astype(mx.float32), b.targets.reshape(-1)[b.idx])
        return b.segments @ token_logp

    def logps(m, b: PairBatch) -> mx.array:
        return mx.concatenate([side(m, b.chosen), side(m, b.rejected)])

    return logps



def preference_loss(method: str, cfg: PreferenceConfig, logp: mx.array, lengths: mx.array,
                    ref: mx.array | None = None, chosen_tokens: float | None = None) -> tuple[mx.array, dict]:
    """Loss and statistics for a batch whose first half is chosen rows and second half rejected.

    `logp`: (2B,) summed log-probs of each answer under the policy; `lengths`: answer
    tokens per row; `ref`: the reference's summed log-probs (DPO). Rewards are
    beta * (policy - reference) for DPO (per token for IPO) and the mean per-token
    log-prob for ORPO; accuracy is the share of pairs whose chosen reward is higher.
    """
    B = logp.shape[0] // 2
    pc, pr = logp[:B], logp[B:]
    lc, lr = mx.maximum(lengths[:B], 1), mx.maximum(lengths[B:], 1)
    stats = {"chosen_logp": pc.mean(), "rejected_logp": pr.mean()}
    if method == "dpo":
        rc, rr = ref[:B], ref[B:]
        if cfg.loss == "ipo":  # IPO regresses the per-token log-ratio gap onto 1 / (2 beta)
            chosen_reward, rejected_reward = (pc - rc) / lc, (pr - rr) / lr
            loss = ((chosen_reward - rejected_reward - 1 / (2 * cfg.beta)) ** 2).mean()
            chosen_reward, rejected_reward = cfg.beta * chosen_reward, cfg.beta * rejected_reward
        else:
            chosen_reward, rejected_reward = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
            margin = chosen_reward - rejected_reward
            ls = cfg.label_smoothing
            loss = (-(1 - ls) * nn.log_sigmoid(margin) - ls * nn.log_sigmoid(-margin)).mean()
    elif method == "orpo":
        # Mean per-token log-probs, clamped below 0 so log(1 - p) stays finite.
        ac, ar = mx.minimum(pc / lc, -1e-6), mx.minimum(pr / lr, -1e-6)
        log_odds = (ac - ar) - (mx.log(-mx.expm1(ac)) - mx.log(-mx.expm1(ar)))
        nll = -pc.sum() / (lc.sum() if chosen_tokens is None else chosen_tokens)  # SFT loss on the chosen answers, token-weighted
        odds_ratio_loss = -nn.log_sigmoid(log_odds).mean()
        loss = nll + cfg.orpo_lambda * odds_ratio_loss
        chosen_reward, rejected_reward = ac, ar
        stats.update(nll_loss=nll, odds_ratio_loss=odds_ratio_loss)
    else:
        raise MlxftError(f"unknown preference method '{method}'; one of {', '.join(PREFERENCE_METHODS)}")
    stats["reward_margin"] = (chosen_reward - rejected_reward).mean()
    stats["preference_accuracy"] = (chosen_reward > rejected_reward).astype(mx.float32).mean()
    return loss, stats


def make_loss(model: nn.Module, recipe: Recipe) -> Callable:
    """fn(model, batch) -> (loss, stats) for nn.value_and_grad (the loss is differentiated, stats ride along)."""
    logps = make_logps(model, recipe.model.family)
    method, cfg = recipe.train.method, recipe.preference

    def loss_fn(m, b: PairBatch):
        return preference_loss(method, cfg, logps(m, b), b.lengths, b.ref, b.chosen_tokens)

    return loss_fn


def pair_logps(model: nn.Module, family: str, pairs: list[Pair], batch_size: int, desc: str | None = None) -> np.ndarray:
    """(N, 2) summed log-probs of the chosen and rejected answers (no gradients, eval mode).

    `desc` shows a progress bar with that label (it takes minutes on a CPU for a few hundred pairs).
    """
    logps = make_logps(model, family)
    was_training = model.training
    model.eval()
    out = np.zeros((len(pairs), 2), dtype=np.float64)
    starts = range(0, len(pairs), batch_size)
    for lo in tqdm(starts, desc=desc, unit="batch", file=sys.stderr, disable=desc is None, leave=False):
        chunk = pairs[lo : lo + batch_size]
        values = np.array(logps(model, collate_pairs(chunk)))
        out[lo : lo + len(chunk), 0] = values[: len(chunk)]
        out[lo : lo + len(chunk), 1] = values[len(chunk) :]
    model.train(was_training)
    return out


def set_reference(model: nn.Module, family: str, pairs: list[Pair], batch_size: int) -> None:
    """Store the (adapter-free) model's log-probs on each pair: DPO's reference, computed once."""
    values = pair_logps(model, family, pairs, batch_size, desc="reference log-probs")
    for p, (c, r) in zip(pairs, values):
        p.ref_chosen, p.ref_rejected = float(c), float(r)



class Preference(Objective):
    """DPO or ORPO: the loss of `recipe.train.method` on preference pairs."""

    unit = "pairs"
    stats = {"reward_margin": ("margin", ".2f"), "preference_accuracy": ("acc", ".2f"),
             "chosen_logp": ("chosen", ".1f"), "rejected_logp": ("rejected", ".1f")}

    def __init__(self, recipe: Recipe, train_set: list[Pair], valid_set: list[Pair]):
        self.recipe, self.method = recipe, recipe.train.method
        if self.method not in PREFERENCE_METHODS:
            raise MlxftError(f"train.method={self.method} is not a preference method ({', '.join(PREFERENCE_METHODS)})")
        self.name = self.method
        self.train_set, self.valid_set = train_set, valid_set
        self.batches = EpochBatches(train_set, recipe.train, length=lambda q: q.length)
        self.loss_fn = self._value_and_grad = None

    @classmethod
    def from_data(cls, recipe: Recipe, data: TrainingData) -> "Preference":
        t, system = recipe.train, recipe.data.system_prompt
        require_pairs({s: data.examples(s) for s in ("train", "valid")}, t.method)
        train_set, valid_set = (
            encode_pairs(data.tokenizer, [e.row for e in data.examples(s)], system, t.max_seq_length,
                         [e.where for e in data.examples(s)]) for s in ("train", "valid"))
        if len(train_set) < t.batch_size:
            raise DataError(f"{data.path}/train.jsonl has {len(train_set)} pairs, fewer than batch_size={t.batch_size}")
        if t.val_batches >= 0:  # only the pairs validation scores need a reference
            valid_set = valid_set[: t.batch_size * t.val_batches]
        return cls(recipe, train_set, valid_set)

    def before_adapters(self, model, log):
        """DPO's reference: the bare base's log-probs of the pairs the run will see, computed once."""
        if self.method != "dpo":
            return
        t = self.recipe.train
        tic = time.perf_counter()
        steps = total_steps(self.recipe, len(self.train_set))
        needed = [self.train_set[i] for i in self.batches.first(steps * t.grad_accumulation)] + self.valid_set
        # Before any adapter exists this IS the base model: the reference, with no second copy.
        set_reference(model, self.recipe.model.family, needed, t.batch_size)
        log(f"reference log-probs of {len(needed)} pairs in {time.perf_counter() - tic:.0f}s")

    def attach(self, model, paths):
        self.loss_fn = make_loss(model, self.recipe)
        self._value_and_grad = nn.value_and_grad(model, self.loss_fn)

    def counts(self, items):
        return (sum(len(p.chosen.ids) + len(p.rejected.ids) - 2 for p in items),
                sum(int(p.chosen.mask[1:].sum()) + int(p.rejected.mask[1:].sum()) for p in items))

    def loss_and_grad(self, model, items, batch):
        pairs = collate_pairs(items)
        if len(items) != len(batch):  # a data-parallel rank's slice: ORPO's token weighting is global
            chosen = sum(int(np.maximum(p.chosen.mask[1:].sum(), 1)) for p in batch)
            pairs.chosen_tokens = chosen * len(items) / len(batch)
        (loss, stats), grads = self._value_and_grad(model, pairs)
        return loss, grads, stats

    def validation_sums(self, model, items, batch_size):
        """Loss and statistics summed per pair over `items`, and the number of pairs."""
        totals: dict[str, float] = {}
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            loss, stats = self.loss_fn(model, collate_pairs(chunk))
            mx.eval(loss, stats)
            for k, v in {"loss": loss, **stats}.items():
                totals[k] = totals.get(k, 0.0) + v.item() * len(chunk)
        return totals, len(items)

    def describe(self, stats, prefix=""):
        if "preference_accuracy" not in stats:
            return ""
        return f", {prefix}preference accuracy {stats['preference_accuracy']:.2f}, reward margin {stats['reward_margin']:.2f}"

    def describe_data(self):
        return {"rows": {"train": len(self.train_set), "valid": len(self.valid_set)},
                "supervised_tokens": {"train": int(sum(p.chosen.mask.sum() for p in self.train_set))}}

    def config_sections(self):
        return {"preference": {
            "method": self.method, **dataclasses.asdict(self.recipe.preference),
            "reference": "the base model without adapters; log-probs computed once before training"
            if self.method == "dpo" else "none (ORPO is reference-free)",
            "supervised_tokens": {"train_chosen": int(sum(p.chosen.mask.sum() for p in self.train_set)),
                                  "train_rejected": int(sum(p.rejected.mask.sum() for p in self.train_set))},
        }}
