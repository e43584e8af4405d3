"""The training loop, once for every method: `fit(session, objective, progress)`.

Micro-batches with gradient accumulation, data-parallel gradient averaging, clipping, the NaN
guard, metrics, validation with the best adapter, early stopping and the overfitting alarm,
Ctrl-C (checkpoint, then stop), periodic checkpoints and the final save. The method is the
`Objective` (objective.py); this module imports none of them.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass

from tqdm import tqdm

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlxft.errors import MlxftError
from mlxft.runs.run import RunDir
from mlxft.training import distributed as dist
from mlxft.training.checkpoint import latest_checkpoint, save_adapters, save_checkpoint
from mlxft.training.objective import Objective, Session
from mlxft.training.progress import Progress

# Validations in a row with rising validation loss (while train loss falls) before the
# overfitting alarm: one or two rises are often noise on a small validation subset.
OVERFIT_RISES = 3


class TrainingDiverged(MlxftError):
    """The loss or the gradients became NaN/inf; the run stopped before saving that state."""


@dataclass
class TrainResult:
    run: RunDir
    steps: int
    final_train_loss: float
    final_val_loss: float | None
    seconds: float
    supervised_tokens_per_sec: float
    tokens_per_sec: float
    peak_memory_gb: float
    best_val_loss: float | None = None
    best_step: int | None = None
    stopped_early: bool = False


def fit(s: Session, objective: Objective, p: Progress) -> TrainResult:
    """Train from `p` to the end (or early stop), checkpointing; Ctrl-C checkpoints and re-raises."""
    t = s.recipe.train
    mx.reset_peak_memory()
    bar = tqdm(total=s.steps, initial=p.step, desc=objective.name, unit="step", dynamic_ncols=True, file=sys.stderr)
    try:
        with s.paths.applied(s.model), _deferred_sigint() as interrupted:
            while p.step < s.steps and not p.stop_reason:
                train_step(s, objective, p)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{p.last_loss:.3f}",
                    tok_s=f"{p.tokens / max(p.train_seconds, 1e-9):.0f}",
                    **{label: f"{p.last_stats[k]:{fmt}}" for k, (label, fmt) in objective.stats.items() if k in p.last_stats},
                    val=f"{p.val_loss:.3f}" if p.val_loss is not None else "-",
                )
                _after_step(s, objective, p, bar.write)
                if p.step == s.steps or p.stop_reason:
                    break  # _finish writes the final checkpoint, even after a late Ctrl-C
                saved = bool(t.save_every) and p.step % t.save_every == 0
                if saved:
                    save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, t.keep_checkpoints)
                if dist.any_rank(interrupted.is_set()):  # every rank stops at the same step
                    _stop_interrupted(s, p, saved)
    finally:
        bar.close()
    return _finish(s, objective, p)


def train_step(s: Session, objective: Objective, p: Progress) -> None:
    """One optimizer step over grad_accumulation micro-batches; refuses to apply a non-finite update."""
    t = s.recipe.train
    tic = time.perf_counter()
    grads_acc, step_loss, stats_acc = None, 0.0, {}
    with dist.rank_rng():
        for _ in range(t.grad_accumulation):
            items = objective.batches.next(p)
            # With several ranks: this rank's slice of the global batch, weighted by its share.
            mine, weight = dist.shard_batch(items, objective.weights(items))
            loss, grads, stats = objective.loss_and_grad(s.model, mine, items)
            if weight != 1.0:
                loss, grads = loss * weight, _tree_scale(grads, weight)
                stats = {k: v * weight for k, v in stats.items()}
            grads_acc = grads if grads_acc is None else _tree_add(grads_acc, grads)
            stats_acc = {k: stats_acc[k] + v if k in stats_acc else v for k, v in stats.items()}
            step_loss += loss
            n_tok, n_sup = objective.counts(items)
            p.tokens += n_tok
            p.supervised_tokens += n_sup
    grads_acc, step_loss, stats_acc = dist.reduce_step(grads_acc, step_loss, stats_acc)  # over ranks (no-op on one)
    n = t.grad_accumulation
    if n > 1:
        grads_acc, step_loss = _tree_scale(grads_acc, 1.0 / n), step_loss / n
    if t.max_grad_norm:
        grads_acc, grad_norm = optim.clip_grad_norm(grads_acc, t.max_grad_norm)
    else:
        grad_norm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads_acc)))
    mx.eval(step_loss, grad_norm, grads_acc, stats_acc)
    loss_value, norm_value = step_loss.item(), grad_norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        # `mlxft runs` reads this line to tell a diverged run from an interrupted one.
        s.run.log_metrics({"step": p.step + 1, "event": "diverged", "loss": str(loss_value), "grad_norm": str(norm_value)})
        raise TrainingDiverged(_divergence_message(s, p.step + 1, loss_value, norm_value))
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


def train_record(s: Session, p: Progress) -> dict:
    """The metrics.jsonl line for the steps since the last one (with the objective's mean statistics)."""
    return {
        "step": p.step,
        "train_loss": p.window_loss / p.window_n,
        **{k: v / p.window_n for k, v in p.window_stats.items()},
        "learning_rate": float(s.optimizer.learning_rate.item()),
        "tokens": p.tokens,
        "supervised_tokens": p.supervised_tokens,
        "tokens_per_sec": p.tokens / p.train_seconds,
        "supervised_tokens_per_sec": p.supervised_tokens / p.train_seconds,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "elapsed_sec": p.train_seconds,
    }


def _after_step(s: Session, objective: Objective, p: Progress, write) -> None:
    """Metrics line every report_every steps; validation, best adapter and early stopping every val_every."""
    t = s.recipe.train
    last = p.step == s.steps
    if p.step % t.report_every == 0 or last:
        s.run.log_metrics(train_record(s, p))
        p.window_loss, p.window_n, p.window_stats = 0.0, 0, {}
    if objective.valid_set and (p.step % t.val_every == 0 or last):
        _validate(s, objective, p, write)


def validation_stats(s: Session, objective: Objective) -> dict[str, float]:
    """Mean loss and statistics on a fixed subset of the validation items (eval mode, no gradients),
    each rank scoring a slice of them."""
    t = s.recipe.train
    items = objective.valid_set
    n = len(items) if t.val_batches < 0 else min(len(items), t.batch_size * t.val_batches)
    s.model.eval()
    sums, weight = dist.validation_sums(objective.validation_sums, s.model, items[:n], t.batch_size,
                                        ("loss", *objective.stats))
    s.model.train()
    return {k: v / max(weight, 1) for k, v in sums.items()}


def _validate(s: Session, objective: Objective, p: Progress, write) -> None:
    stats = validation_stats(s, objective)
    p.val_loss = stats["loss"]
    extra = {f"val_{k}": stats[k] for k in objective.stats if k in stats}
    s.run.log_metrics({"step": p.step, "val_loss": p.val_loss, **extra})
    write(f"step {p.step}: train loss {p.last_loss:.3f}, validation loss {p.val_loss:.3f}"
          + objective.describe(stats, "validation "))
    p.history.append([p.val_loss, p.since_val_loss / max(p.since_val_n, 1)])
    p.since_val_loss, p.since_val_n = 0.0, 0
    if p.best_val_loss is None or p.val_loss < p.best_val_loss:
        p.best_val_loss, p.best_step = p.val_loss, p.step
        save_adapters(s.model, s.run.best_dir, s.adapter_cfg)
        s.config["best"] = {"step": p.step, "val_loss": p.val_loss, "path": str(s.run.best_dir), **extra}
        s.run.write_config(s.config)
    if overfitting(p.history):
        recent = [h[0] for h in p.history[-OVERFIT_RISES - 1 :]]
        s.run.log_metrics({"step": p.step, "event": "overfitting", "val_losses": recent})
        write(
            f"warning: validation loss rose {OVERFIT_RISES} validations in a row while train loss fell: the model is "
            f"memorising the training rows (best adapter so far: step {p.best_step}, kept in {s.run.best_dir})"
        )
    _early_stopping(s, p, write)


def overfitting(history: list[list[float]]) -> bool:
    """True on the validation that completes OVERFIT_RISES rises in a row while train loss fell over them."""
    if len(history) < OVERFIT_RISES + 1:
        return False
    recent = history[-OVERFIT_RISES - 1 :]
    rising = all(b[0] > a[0] for a, b in zip(recent, recent[1:]))
    longer = len(history) > OVERFIT_RISES + 1 and history[-OVERFIT_RISES - 1][0] > history[-OVERFIT_RISES - 2][0]
    return rising and not longer and recent[-1][1] < recent[0][1]


def _early_stopping(s: Session, p: Progress, write) -> None:
    """Stop after `patience` validations without beating the reference by min_delta."""
    t = s.recipe.train
    if p.patience_ref is None or p.val_loss < p.patience_ref - t.early_stopping_min_delta:
        p.patience_ref, p.bad_evals = p.val_loss, 0
        return
    p.bad_evals += 1
    if t.early_stopping_patience and p.bad_evals >= t.early_stopping_patience:
        p.stop_reason = "early stopping"
        s.run.log_metrics({"step": p.step, "event": "early_stop", "best_step": p.best_step, "best_val_loss": p.best_val_loss})
        write(
            f"early stopping at step {p.step}: validation loss has not improved by {t.early_stopping_min_delta} "
            f"for {p.bad_evals} validations; best {p.best_val_loss:.4f} at step {p.best_step} ({s.run.best_dir})"
        )


@contextlib.contextmanager
def _deferred_sigint():
    """First Ctrl-C: finish the current step, then checkpoint and stop. A second Ctrl-C stops at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        flag.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop_interrupted(s: Session, p: Progress, saved: bool) -> None:
    t = s.recipe.train
    if not saved:
        save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, t.keep_checkpoints)
    save_adapters(s.model, s.run.adapters, s.adapter_cfg)
    s.run.log_metrics({"step": p.step, "event": "interrupted"})  # `mlxft runs`: resumable, not still running
    s.log(
        f"\ninterrupted at step {p.step} of {s.steps}: checkpoint saved in {s.run.checkpoint(p.step)}\n"
        f"resume with: mlxft train --resume {s.run.root}" + (" (and the same --hosts/--hostfile)" if dist.size() > 1 else "")
    )
    dist.finish_interrupted()
    raise KeyboardInterrupt


def _divergence_message(s: Session, step: int, loss: float, norm: float) -> str:
    t = s.recipe.train
    ckpt = latest_checkpoint(s.run)
    kept = f"the last good checkpoint is {ckpt}" if ckpt else f"no checkpoint was written yet (the first comes at step {t.save_every})"
    clip = f"lower train.max_grad_norm (now {t.max_grad_norm})" if t.max_grad_norm else "set train.max_grad_norm=1.0 (now off)"
    precision = s.config.get("base_model", {}).get("precision", "?")
    return (
        f"training diverged at step {step}: loss {loss}, gradient norm {norm}; the step was not applied and {kept}. "
        f"Likely causes, most likely first: learning rate too high (try train.learning_rate={t.learning_rate / 5:.2g}, "
        f"now {t.learning_rate}); {clip}; a broken row in train.jsonl (empty, or extremely long); "
        f"fp16 overflow (the base is {precision}: use a bf16 or fp32 base). Change one and start a new run"
    )


def _finish(s: Session, objective: Objective, p: Progress) -> TrainResult:
    """The end of a run: final adapters, final checkpoint (marked finished), the result in config.json."""
    stopped_early = p.stop_reason == "early stopping"
    p.stop_reason = p.stop_reason or "done"
    save_adapters(s.model, s.run.adapters, s.adapter_cfg)
    save_checkpoint(s.run, s.model, s.optimizer, p, s.adapter_cfg, s.recipe.train.keep_checkpoints)
    seconds = max(p.train_seconds, 1e-9)
    result = TrainResult(
        run=s.run,
        steps=p.step,
        final_train_loss=p.last_loss,
        final_val_loss=p.val_loss,
        seconds=p.train_seconds,
        supervised_tokens_per_sec=p.supervised_tokens / seconds,
        tokens_per_sec=p.tokens / seconds,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        best_val_loss=p.best_val_loss,
        best_step=p.best_step,
        stopped_early=stopped_early,
    )
    s.config["result"] = {k: v for k, v in result.__dict__.items() if k != "run"}
    if p.last_stats:
        s.config["result"]["last_stats"] = p.last_stats
    s.config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    s.run.write_config(s.config)
    label = "" if objective.name == "train" else f"{objective.name.upper()} "
    s.log(
        f"done: {p.step} {label}steps in {p.train_seconds:.0f}s, {result.tokens_per_sec:.0f} tokens/s "
        f"({result.supervised_tokens_per_sec:.1f} supervised/s), peak memory {result.peak_memory_gb:.2f} GB"
        + objective.describe(p.last_stats, "last step: ")
        + f"; adapters in {s.run.adapters}" + (f" (best: {s.run.best_dir}, step {p.best_step})" if p.best_step else "")
    )
    return result


def _tree_add(a, b):
    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, factor):
    return tree_map(lambda x: x * factor, a)
