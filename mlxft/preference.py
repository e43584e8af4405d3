"""Preference tuning: DPO and ORPO on (prompt, chosen, rejected) pairs.

Run it as `mlxft train RECIPE --method dpo|orpo` (or `train.method:` in the recipe);
`mlxft train --resume RUN` continues a stopped run as for SFT.

- DPO (Rafailov et al. 2023) raises the policy's log-prob ratio to a reference model on
  the chosen answer over the rejected one. The reference is the frozen base itself: its
  log-probs of every pair are computed once, before the adapters are attached, so no
  second copy of the weights is ever held (and DoRA / full fine-tunes work the same way).
  Loss variants: `sigmoid` (with optional label smoothing) and `ipo` (Azar et al. 2023).
- ORPO (Hong et al. 2024) needs no reference: one stage of SFT loss on the chosen answer
  plus `orpo_lambda` times the odds-ratio loss between chosen and rejected.

Only the answer (the turns after the prompt's last user message) is scored; the prompt
is context. Everything else is the SFT machinery of mlxft/train.py, used by import: model
loading, LoRA/DoRA attach, optimizer and schedule, length-bucketed batch order, run
folder, full-state checkpoints, best adapter, early stopping and the NaN guard.

Logged per step (progress bar and RUN/metrics.jsonl): loss, reward_margin,
preference_accuracy, chosen_logp and rejected_logp (summed log-prob of each answer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlxft import train as sft
from mlxft.checkpoint import (
    Progress, describe_skipped, load_checkpoint, newest_complete_checkpoint, read_progress,
    save_adapters, save_checkpoint, truncate_metrics,
)
from mlxft.config import PreferenceConfig, Recipe
from mlxft.data import Encoded, Rendered, encode_rendered, pad_rows, render_row
from mlxft.fastmath import fast_activations
from mlxft.errors import DataError, MlxftError
from mlxft.models import BaseModel, load_base
from mlxft.run_format import check_resumable
from mlxft.runs import RunDir

PREFERENCE_METHODS = ("dpo", "orpo")
# Per-step statistics besides the loss; averaged over report_every steps in metrics.jsonl.
STAT_KEYS = ("reward_margin", "preference_accuracy", "chosen_logp", "rejected_logp")


# ---------------------------------------------------------------- pairs


@dataclass
class Pair:
    """One preference pair as token ids; masks cover the answer only (not the prompt)."""

    chosen: Encoded
    rejected: Encoded
    where: str = ""
    # The reference model's summed log-probs of each answer (DPO only; NaN until computed).
    ref_chosen: float = math.nan
    ref_rejected: float = math.nan

    @property
    def length(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids)


def split_pair(row: dict) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen, rejected) messages of a normalised preference row.

    mlxft.formats stores a pair as {"messages": prompt + chosen, "rejected": [...]}. The
    prompt runs through the last user message; the chosen answer is what follows it.
    """
    messages, rejected = row["messages"], row.get("rejected")
    if not rejected:
        raise DataError("not a preference pair: no rejected answer")
    if isinstance(rejected, str):  # a chat row may carry its rejected answer as plain text
        rejected = [{"role": "assistant", "content": rejected}]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    cut = users[-1] + 1 if users else len(messages) - 1
    return messages[:cut], messages[cut:], rejected


def render_pair(tokenizer, row: dict, system_prompt: str | None) -> tuple[Rendered, Rendered]:
    """Render prompt+chosen and prompt+rejected; only the answers' assistant turns are supervised."""
    prompt, chosen, rejected = split_pair(row)
    n_prompt_turns = sum(m["role"] == "assistant" for m in prompt)
    out = []
    for answer in (chosen, rejected):
        sub = {"messages": prompt + answer, **({"tools": row["tools"]} if row.get("tools") else {})}
        r = render_row(tokenizer, sub, system_prompt)
        r.turns = r.turns[n_prompt_turns:]  # assistant turns inside the prompt are context, not compared
        out.append(r)
    return out[0], out[1]


def encode_pairs(tokenizer, rows: list[dict], system_prompt: str | None, max_length: int | None,
                 where: list[str] | None = None) -> list[Pair]:
    """Token ids and answer masks of each pair, tokenized in one batch."""
    where = where or [f"row {i + 1}" for i in range(len(rows))]
    rendered: list[Rendered] = []
    for row, loc in zip(rows, where):
        try:
            rendered += render_pair(tokenizer, row, system_prompt)
        except DataError as e:
            raise DataError(f"{loc}: {e}") from None
    encoded = encode_rendered(tokenizer, rendered, max_length)
    pairs = []
    for i, loc in enumerate(where):
        chosen, rejected = encoded[2 * i], encoded[2 * i + 1]
        if not chosen.mask.any() or not rejected.mask.any():
            raise DataError(f"{loc}: the prompt fills max_seq_length={max_length} tokens, so nothing of the "
                            "chosen or rejected answer is left to compare; raise train.max_seq_length or shorten it")
        pairs.append(Pair(chosen, rejected, loc))
    return pairs


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


def _pad(rows: list[Encoded]) -> tuple[Padded, np.ndarray]:
    inputs, targets, mask = pad_rows(rows)
    T = mask.shape[1]
    idx = np.flatnonzero(mask)
    segments = np.zeros((len(rows), len(idx)), dtype=np.float32)
    segments[idx // T, np.arange(len(idx))] = 1.0
    padded = Padded(mx.array(inputs), mx.array(targets), mx.array(idx.astype(np.int32)), mx.array(segments))
    return padded, mask.sum(1)


def collate_pairs(pairs: list[Pair]) -> PairBatch:
    """The chosen rows and the rejected rows of a batch, each padded to its own longest row."""
    chosen, n_chosen = _pad([p.chosen for p in pairs])
    rejected, n_rejected = _pad([p.rejected for p in pairs])
    lengths = np.concatenate([n_chosen, n_rejected]).astype(np.float32)
    ref = np.array([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs], dtype=np.float32)
    n_tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) - 2 for p in pairs)
    return PairBatch(chosen, rejected, mx.array(lengths), mx.array(ref), n_tokens, int(lengths.sum()))


def make_logps(model: nn.Module, family: str) -> Callable:
    """fn(model, batch) -> (2B,) summed log-probs of each row's supervised tokens (chosen, then rejected).

    As in SFT, the lm-head runs only at supervised positions where the family allows it.
    """
    sparse = family in sft._SPARSE_HEAD_FAMILIES and hasattr(model, "model")

    def side(m, b: Padded) -> mx.array:
        if sparse:
            h = m.model(b.inputs)
            logits = sft.lm_head(m, h.reshape(-1, h.shape[-1])[b.idx])
        else:
            logits = m(b.inputs)
            logits = logits.reshape(-1, logits.shape[-1])[b.idx]
        token_logp = -nn.losses.cross_entropy(logits.astype(mx.float32), b.targets.reshape(-1)[b.idx])
        return b.segments @ token_logp

    def logps(m, b: PairBatch) -> mx.array:
        return mx.concatenate([side(m, b.chosen), side(m, b.rejected)])

    return logps


# ---------------------------------------------------------------- losses


def preference_loss(method: str, cfg: PreferenceConfig, logp: mx.array, lengths: mx.array,
                    ref: mx.array | None = None) -> tuple[mx.array, dict]:
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
        nll = -pc.sum() / lc.sum()  # the SFT loss on the chosen answers, token-weighted as in train.py
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
        return preference_loss(method, cfg, logps(m, b), b.lengths, b.ref)

    return loss_fn


def pair_logps(model: nn.Module, family: str, pairs: list[Pair], batch_size: int, desc: str | None = None) -> np.ndarray:
    """(N, 2) summed log-probs of the chosen and rejected answers (no gradients, eval mode).

    `desc` shows a progress bar with that label (it takes minutes on a CPU for a few hundred pairs).
    """
    from tqdm import tqdm

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


# ---------------------------------------------------------------- data


def check_pairs(data_dir: Path, method: str, splits=("train", "valid")) -> None:
    """Every row of the training splits must be a pair; say which is not, before weights load."""
    from mlxft.formats import load_dataset

    ds = load_dataset(data_dir)
    for split in splits:
        missing = [ex.where for ex in ds.splits.get(split, []) if "rejected" not in ex.row]
        if missing:
            raise DataError(
                f"{missing[0]}: train.method={method} trains on preference pairs (prompt + chosen + rejected), "
                f"but this row has no rejected answer ({len(missing)} such row(s) in {split}); "
                "use train.method=sft for plain chat data"
            )


def load_pairs(data_dir: Path, tokenizer, recipe: Recipe, split: str) -> list[Pair]:
    """The encoded pairs of one split, each remembering its file and line."""
    from mlxft.formats import load_dataset

    examples = load_dataset(data_dir).splits.get(split, [])
    return encode_pairs(tokenizer, [e.row for e in examples], recipe.data.system_prompt,
                        recipe.train.max_seq_length, [e.where for e in examples])


# ---------------------------------------------------------------- the run


@dataclass
class PrefProgress(Progress):
    """Progress plus the running sums of the preference statistics since the last metrics line."""

    window_stats: dict = field(default_factory=dict)
    last_stats: dict = field(default_factory=dict)


@dataclass
class PrefSession:
    """What one preference run works with (the attribute names train.py's helpers expect)."""

    recipe: Recipe
    run: RunDir
    config: dict
    adapter_cfg: dict
    model: nn.Module
    optimizer: optim.Optimizer
    loss_fn: Callable
    loss_and_grad: Callable
    train_set: list[Pair]
    valid_set: list[Pair]
    steps: int
    log: Callable
    order: list[np.ndarray] = field(default_factory=list)
    order_epoch: int = -1


def train_preference(recipe: Recipe, data_dir: str | Path | None = None, runs_root: Path | None = None,
                     log=print) -> sft.TrainResult:
    """DPO or ORPO on the pairs in `data_dir`; writes a run folder like SFT does."""
    method = recipe.train.method
    if method not in PREFERENCE_METHODS:
        raise MlxftError(f"train.method={method} is not a preference method ({', '.join(PREFERENCE_METHODS)})")
    sft.check_train_settings(recipe.train)
    data_dir = sft.resolve_data_dir(data_dir or recipe.data.path)
    sft.check_data(recipe, data_dir, log)
    check_pairs(data_dir, method)
    base, train_set, valid_set = _load(recipe, data_dir, log)
    run = RunDir.create(recipe.name, runs_root)
    s = _prepare(recipe, base, train_set, valid_set, run, {}, log)
    s.config = sft._run_card(recipe, base, data_dir, [p.chosen for p in train_set], [p.chosen for p in valid_set],
                             s.steps)
    s.config["preference"] = {
        "method": method, **dataclasses.asdict(recipe.preference),
        "reference": "the base model without adapters; log-probs computed once before training" if method == "dpo"
        else "none (ORPO is reference-free)",
        "supervised_tokens": {"train_chosen": int(sum(p.chosen.mask.sum() for p in train_set)),
                              "train_rejected": int(sum(p.rejected.mask.sum() for p in train_set))},
    }
    run.write_config(s.config)
    t = recipe.train
    log(f"run folder: {run.root}")
    log(f"{method.upper()}: training {s.config['trainable_parameters'] / 1e6:.2f}M of "
        f"{s.config['total_parameters'] / 1e6:.1f}M parameters ({recipe.fine_tune_type}), {len(train_set)} train / "
        f"{len(valid_set)} valid pairs, {s.steps} steps of {t.batch_size}x{t.grad_accumulation} pairs")
    return _run(s, PrefProgress())


def resume_preference(run_path: str | Path, log=print) -> sft.TrainResult:
    """Continue a DPO/ORPO run from its newest checkpoint, with the recipe and data in its config.json."""
    run = RunDir.open(run_path)
    ckpt, skipped = newest_complete_checkpoint(run)  # a damaged newest one: the one before it
    if ckpt is None:
        raise MlxftError(f"{run.root} has no checkpoint to resume from ({run.checkpoints} is empty or missing"
                         + "".join(f"; {p.name} is damaged: {why}" for p, why in skipped)
                         + "); checkpoints are written every train.save_every steps")
    for note in describe_skipped(skipped, ckpt):
        log(note)
    done = read_progress(ckpt)
    if done.stop_reason:
        raise MlxftError(f"{run.root} already finished ({done.stop_reason} at step {done.step}); nothing to resume")
    config = run.read_config()
    check_resumable(config, run.config)
    recipe = sft.recipe_from_dict(config["recipe"])
    data_dir = Path(config["data"]["path"])
    sft._check_same_data(data_dir, config["data"]["sha256"])
    base, train_set, valid_set = _load(recipe, data_dir, log)
    s = _prepare(recipe, base, train_set, valid_set, run, config, log)
    loaded = load_checkpoint(ckpt, s.model, s.optimizer)
    state = json.loads((ckpt / "state.json").read_text())
    progress = PrefProgress(**dataclasses.asdict(loaded), window_stats=state.get("window_stats") or {},
                            last_stats=state.get("last_stats") or {})
    truncate_metrics(run, progress.step)
    run.log_metrics({"step": progress.step, "event": "resumed", "checkpoint": ckpt.name})
    config.setdefault("resumed", []).append({"from_step": progress.step, "at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    run.write_config(config)
    log(f"resuming {run.root} from {ckpt.name} (step {progress.step} of {s.steps})")
    return _run(s, progress)


def _load(recipe: Recipe, data_dir: Path, log) -> tuple[BaseModel, list[Pair], list[Pair]]:
    base = load_base(recipe.model.source, recipe.quantize)
    log(f"base model: {base.path} [{base.precision}]")
    log(base.note)
    train_set = load_pairs(data_dir, base.tokenizer, recipe, "train")
    valid_set = load_pairs(data_dir, base.tokenizer, recipe, "valid")
    t = recipe.train
    if len(train_set) < t.batch_size:
        raise DataError(f"{data_dir}/train.jsonl has {len(train_set)} pairs, fewer than batch_size={t.batch_size}")
    if t.val_batches >= 0:  # only the pairs validation scores need a reference
        valid_set = valid_set[: t.batch_size * t.val_batches]
    return base, train_set, valid_set


def _prepare(recipe: Recipe, base: BaseModel, train_set, valid_set, run: RunDir, config: dict, log) -> PrefSession:
    """Reference log-probs (DPO) on the bare base, then adapters, optimizer and loss: same on resume."""
    t = recipe.train
    model = base.model
    steps = sft.total_steps(recipe, len(train_set))
    if recipe.train.method == "dpo":
        tic = time.perf_counter()
        needed = [train_set[i] for i in visited_pairs(recipe, train_set, steps)] + valid_set
        # Before any adapter exists this IS the base model: the reference, with no second copy.
        set_reference(model, recipe.model.family, needed, t.batch_size)
        log(f"reference log-probs of {len(needed)} pairs in {time.perf_counter() - tic:.0f}s")
    mx.random.seed(t.seed)
    np.random.seed(t.seed)
    sft.attach_adapters(model, recipe)
    model.train()
    optimizer = optim.AdamW(learning_rate=sft.build_schedule(recipe, steps), weight_decay=t.weight_decay)
    loss_fn = make_loss(model, recipe)
    return PrefSession(recipe, run, config, sft.adapter_config(recipe, len(model.layers), base), model, optimizer,
                       loss_fn, nn.value_and_grad(model, loss_fn), train_set, valid_set, steps, log)


def visited_pairs(recipe: Recipe, train_set: list[Pair], steps: int) -> list[int]:
    """Indices of the training pairs the run's batches use (the order is fixed by seed and epoch, see
    `_next_batch`), so a run shorter than an epoch computes reference log-probs only for those."""
    t = recipe.train
    lengths = np.array([q.length for q in train_set])
    needed: set[int] = set()
    left, epoch = steps * t.grad_accumulation, 0
    while left > 0 and len(needed) < len(train_set):
        order = sft.batch_order(lengths, t.batch_size, t.seed, epoch)
        for batch in order[:left]:
            needed.update(batch.tolist())
        left, epoch = left - len(order), epoch + 1
    return sorted(needed)


def _run(s: PrefSession, p: PrefProgress) -> sft.TrainResult:
    """Train from `p` to the end (or early stop), checkpointing; Ctrl-C checkpoints and re-raises."""
    from tqdm import tqdm

    t = s.recipe.train
    mx.reset_peak_memory()
    bar = tqdm(total=s.steps, initial=p.step, desc=t.method, unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        with sft._grad_checkpointing(s.model, t.grad_checkpoint), fast_activations(t.fast_silu), \
                sft._deferred_sigint() as interrupted:
            while p.step < s.steps and not p.stop_reason:
                _train_step(s, p)
                bar.update(1)
                st = p.last_stats
                bar.set_postfix(loss=f"{p.last_loss:.3f}", margin=f"{st['reward_margin']:.2f}",
                                acc=f"{st['preference_accuracy']:.2f}", chosen=f"{st['chosen_logp']:.1f}",
                                rejected=f"{st['rejected_logp']:.1f}",
                                val=f"{p.val_loss:.3f}" if p.val_loss is not None else "-")
                _after_step(s, p, bar.write)
                if p.step == s.steps or p.stop_reason:
                    break
                saved = bool(t.save_every) and p.step % t.save_every == 0
                if saved:
                    save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, t.keep_checkpoints)
                if interrupted.is_set():
                    sft._stop_interrupted(s, p, saved)
    finally:
        bar.close()
    return _finish(s, p)


def _next_batch(s: PrefSession, p: PrefProgress) -> list[Pair]:
    return sft._next_batch(s, p, length=lambda q: q.length)


def _train_step(s: PrefSession, p: PrefProgress) -> None:
    """One optimizer step over grad_accumulation micro-batches; refuses a non-finite update."""
    t = s.recipe.train
    tic = time.perf_counter()
    grads_acc, step_loss, stats_acc = None, 0.0, None
    for _ in range(t.grad_accumulation):
        batch = collate_pairs(_next_batch(s, p))
        (loss, stats), grads = s.loss_and_grad(s.model, batch)
        grads_acc = grads if grads_acc is None else sft._tree_add(grads_acc, grads)
        stats_acc = stats if stats_acc is None else {k: stats_acc[k] + v for k, v in stats.items()}
        step_loss += loss
        p.tokens += batch.n_tokens
        p.supervised_tokens += batch.n_supervised
    n = t.grad_accumulation
    if n > 1:
        grads_acc, step_loss = sft._tree_scale(grads_acc, 1.0 / n), step_loss / n
    if t.max_grad_norm:
        grads_acc, grad_norm = optim.clip_grad_norm(grads_acc, t.max_grad_norm)
    else:
        grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads_acc)))
    mx.eval(step_loss, grad_norm, grads_acc, stats_acc)
    loss_value, norm_value = step_loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        s.run.log_metrics({"step": p.step + 1, "event": "diverged", "loss": str(loss_value), "grad_norm": str(norm_value)})
        raise sft.TrainingDiverged(sft._divergence_message(s, p.step + 1, loss_value, norm_value))
    s.optimizer.update(s.model, grads_acc)
    mx.eval(s.model.state, s.optimizer.state)
    p.train_seconds += time.perf_counter() - tic
    p.step += 1
    p.last_loss = loss_value
    p.last_stats = {k: v.item() / n for k, v in stats_acc.items()}
    for k, v in p.last_stats.items():
        p.window_stats[k] = p.window_stats.get(k, 0.0) + v
    p.window_loss, p.window_n = p.window_loss + loss_value, p.window_n + 1
    p.since_val_loss, p.since_val_n = p.since_val_loss + loss_value, p.since_val_n + 1


def _after_step(s: PrefSession, p: PrefProgress, write) -> None:
    """Metrics line every report_every steps; validation, best adapter and early stopping every val_every."""
    t = s.recipe.train
    last = p.step == s.steps
    if p.step % t.report_every == 0 or last:
        s.run.log_metrics(sft.train_record(s, p, {k: v / p.window_n for k, v in p.window_stats.items()}))
        p.window_loss, p.window_n, p.window_stats = 0.0, 0, {}
    if s.valid_set and (p.step % t.val_every == 0 or last):
        _validate(s, p, write)


def validation_stats(s: PrefSession) -> dict:
    """Mean loss and statistics over the validation pairs (eval mode, no gradients)."""
    t = s.recipe.train
    s.model.eval()
    totals: dict[str, float] = {}
    n = 0
    for lo in range(0, len(s.valid_set), t.batch_size):
        chunk = s.valid_set[lo : lo + t.batch_size]
        loss, stats = s.loss_fn(s.model, collate_pairs(chunk))
        mx.eval(loss, stats)
        for k, v in {"loss": loss, **stats}.items():
            totals[k] = totals.get(k, 0.0) + v.item() * len(chunk)
        n += len(chunk)
    s.model.train()
    return {k: v / max(n, 1) for k, v in totals.items()}


def _validate(s: PrefSession, p: PrefProgress, write) -> None:
    stats = validation_stats(s)
    p.val_loss = stats["loss"]
    s.run.log_metrics({"step": p.step, "val_loss": p.val_loss,
                       **{f"val_{k}": stats[k] for k in STAT_KEYS if k in stats}})
    write(f"step {p.step}: train loss {p.last_loss:.3f}, validation loss {p.val_loss:.3f}, "
          f"validation preference accuracy {stats['preference_accuracy']:.2f}, margin {stats['reward_margin']:.2f}")
    p.history.append([p.val_loss, p.since_val_loss / max(p.since_val_n, 1)])
    p.since_val_loss, p.since_val_n = 0.0, 0
    if p.best_val_loss is None or p.val_loss < p.best_val_loss:
        p.best_val_loss, p.best_step = p.val_loss, p.step
        save_adapters(s.model, s.run.best_dir, s.adapter_cfg)
        s.config["best"] = {"step": p.step, "val_loss": p.val_loss, "path": str(s.run.best_dir),
                            "val_preference_accuracy": stats["preference_accuracy"]}
        s.run.write_config(s.config)
    if sft._overfitting(p.history):
        recent = [h[0] for h in p.history[-sft.OVERFIT_RISES - 1 :]]
        s.run.log_metrics({"step": p.step, "event": "overfitting", "val_losses": recent})
        write(f"warning: validation loss rose {sft.OVERFIT_RISES} validations in a row while train loss fell "
              f"(best adapter so far: step {p.best_step}, kept in {s.run.best_dir})")
    sft._early_stopping(s, p, write)


def _finish(s: PrefSession, p: PrefProgress) -> sft.TrainResult:
    t = s.recipe.train
    result = sft.save_final(s, p, {"last_stats": p.last_stats})
    s.log(f"done: {p.step} {t.method.upper()} steps in {p.train_seconds:.0f}s, {result.tokens_per_sec:.0f} tokens/s, "
          f"peak memory {result.peak_memory_gb:.2f} GB; last step: preference accuracy "
          f"{p.last_stats.get('preference_accuracy', float('nan')):.2f}, reward margin "
          f"{p.last_stats.get('reward_margin', float('nan')):.2f}; adapters in {s.run.adapters}"
          + (f" (best: {s.run.best_dir}, step {p.best_step})" if p.best_step else ""))
    return result


# ---------------------------------------------------------------- eval: does the adapter prefer the chosen style?

PAIRS_SUITE = "house-style-pairs"


def score_pairs(model: nn.Module, tokenizer, family: str, rows: list[dict], system_prompt: str | None,
                max_length: int | None = None, batch_size: int = 8) -> dict:
    """How often the model puts more probability on the chosen answer than on the rejected one.

    `accuracy` compares mean per-token log-probs: a summed log-prob favours the shorter
    answer whatever its style (a concise answer has fewer tokens to pay for), so the sum
    says little about style; it is reported too, as `accuracy_summed`.
    """
    pairs = encode_pairs(tokenizer, rows, system_prompt, max_length)
    logps = pair_logps(model, family, pairs, batch_size)
    lengths = np.array([[p.chosen.mask.sum(), p.rejected.mask.sum()] for p in pairs], dtype=np.float64)
    per_token = logps / np.maximum(lengths, 1)
    return {
        "accuracy": float((per_token[:, 0] > per_token[:, 1]).mean()),
        "accuracy_summed": float((logps[:, 0] > logps[:, 1]).mean()),
        "margin_per_token": float((per_token[:, 0] - per_token[:, 1]).mean()),
        "chosen_logp": float(logps[:, 0].mean()),
        "rejected_logp": float(logps[:, 1].mean()),
        "per_pair": (per_token[:, 0] - per_token[:, 1]).tolist(),
    }


def score_examples(model: nn.Module, tokenizer, examples, batch_size: int = 8) -> dict:
    """`score_pairs` for eval-suite examples (mlxft.scorers.Example): the prompt as the suite built
    it, the reference as the chosen answer and the row's `rejected` as the rejected one."""
    rows = []
    for i, e in enumerate(examples):
        if not e.row.get("rejected"):
            raise DataError(f"row {i + 1} of the suite's data has no 'rejected' answer (preference_accuracy needs one)")
        rows.append({"messages": [*e.messages, {"role": "assistant", "content": e.reference}],
                     "rejected": e.row["rejected"]})
    family = getattr(getattr(model, "args", None), "model_type", "")
    return score_pairs(model, tokenizer, family, rows, None, None, batch_size)


def read_pair_rows(path: Path) -> list[dict]:
    """Normalised preference rows of a file (any format mlxft reads); DataError names file:line."""
    from mlxft.formats import load_dataset

    ds = load_dataset(Path(path))
    errors = [p for p in ds.problems if p.severity == "error"]
    if errors:
        raise DataError(str(errors[0]))
    rows = [ex for split in ds.splits.values() for ex in split]
    missing = [ex.where for ex in rows if "rejected" not in ex.row]
    if missing or not rows:
        raise DataError(f"{missing[0] if missing else path}: expected preference pairs (prompt + chosen + rejected)")
    return [ex.row for ex in rows]


def compare_pairs(run_path: str | Path, data: str | Path | None = None, log=print) -> dict:
    """Score the run's base and adapter on held-out pairs; merge the suite into RUN/eval.json.

    `data` defaults to the run's test split. The suite entry follows eval.json's schema
    (version 2): one `preference_accuracy` scorer, gated on the adapter beating the base.
    """
    from mlx_lm.tuner.utils import load_adapters

    from mlxft.models import load_run_base

    run = RunDir.open(run_path)
    cfg = run.read_config()
    recipe = sft.recipe_from_dict(cfg["recipe"])
    path = Path(data) if data else Path(cfg["data"]["path"]) / "test.jsonl"
    rows = read_pair_rows(path)
    adapters = run.best_adapters
    if not (adapters / "adapters.safetensors").is_file():
        raise MlxftError(f"run {run.root} has no adapters yet ({adapters}/adapters.safetensors missing)")
    base = load_run_base(cfg)
    system, family = cfg.get("system_prompt"), recipe.model.family
    seconds, scores = {}, {}
    for side in ("base", "adapter"):
        if side == "adapter":
            load_adapters(base.model, str(adapters))
        log(f"scoring the {side} on {len(rows)} preference pairs from {path} ...")
        tic = time.perf_counter()
        scores[side] = score_pairs(base.model, base.tokenizer, family, rows, system, recipe.train.max_seq_length,
                                   recipe.train.batch_size)
        seconds[side] = round(time.perf_counter() - tic, 2)
    values = {side: scores[side]["accuracy"] for side in scores}
    worst = np.argsort(scores["adapter"]["per_pair"])[:10]
    suite = {
        "description": "held-out preference pairs: share where the model gives the chosen (house-style) answer "
                       "a higher mean per-token log-prob than the rejected one",
        "data": str(path),
        "n": len(rows),
        "seconds": seconds,
        "scorers": [{
            "name": "preference_accuracy", "type": "preference_accuracy", "higher_is_better": True, "unit": "fraction",
            "values": values, "delta": values["adapter"] - values["base"],
            "gate": {"rule": "adapter > base", "passed": values["adapter"] > values["base"]},
            "details": {k: {side: scores[side][k] for side in scores}
                        for k in ("accuracy_summed", "margin_per_token", "chosen_logp", "rejected_logp")},
        }],
        "failures": [{"prompt": _prompt_text(rows[i]), "reference": rows[i]["messages"][-1]["content"],
                      "base": f"per-token margin {scores['base']['per_pair'][i]:+.3f}",
                      "adapter": f"per-token margin {scores['adapter']['per_pair'][i]:+.3f}",
                      "scorer": "preference_accuracy"}
                     for i in worst if scores["adapter"]["per_pair"][i] <= 0],
    }
    suite["passed"] = suite["scorers"][0]["gate"]["passed"]
    result = _merge_eval_json(run, suite, cfg)
    return result


def _prompt_text(row: dict) -> str:
    prompt, _, _ = split_pair(row)
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _merge_eval_json(run: RunDir, suite: dict, cfg: dict) -> dict:
    """Add (or replace) this suite in RUN/eval.json, keeping the other suites an eval wrote."""
    try:
        result = json.loads(run.eval_json.read_text())
        if not isinstance(result.get("suites"), dict):
            raise ValueError
    except (OSError, ValueError):
        result = {"version": 2, "run": str(run.root), "base_model": cfg["recipe"]["model"]["source"],
                  "adapter": str(run.best_adapters), "suites": {}}
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["suites"][PAIRS_SUITE] = suite
    result["passed"] = all(s.get("passed", True) is not False for s in result["suites"].values())
    from mlxft.runs import write_atomic

    write_atomic(run.eval_json, json.dumps(result, indent=2) + "\n")
    return result


def format_pairs(result: dict) -> str:
    s = result["suites"][PAIRS_SUITE]
    sc = s["scorers"][0]
    v, d = sc["values"], sc["details"]
    return "\n".join([
        f"preference accuracy on {s['n']} held-out pairs (chosen beats rejected by mean per-token log-prob):",
        f"  base     {100 * v['base']:5.1f}%   (summed log-prob: {100 * d['accuracy_summed']['base']:5.1f}%)",
        f"  adapter  {100 * v['adapter']:5.1f}%   (summed log-prob: {100 * d['accuracy_summed']['adapter']:5.1f}%)",
        f"  delta    {100 * sc['delta']:+5.1f} points; mean per-token margin "
        f"{d['margin_per_token']['base']:+.3f} -> {d['margin_per_token']['adapter']:+.3f}",
    ])
