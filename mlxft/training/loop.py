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


def fit(session: Session, objective: Objective, progress: Progress) -> TrainResult:
    """Train from `progress` to the end (or early stop), checkpointing; Ctrl-C checkpoints and re-raises."""
    t = session.recipe.train
    mx.reset_peak_memory()
    bar = tqdm(total=session.steps, initial=progress.step, desc=objective.name, unit="step", dynamic_ncols=True,
               file=sys.stderr)
    try:
        with session.paths.applied(session.model), _deferred_sigint() as interrupted:
            while progress.step < session.steps and not progress.stop_reason:
                train_step(session, objective, progress)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{progress.last_loss:.3f}",
                    tok_s=f"{progress.tokens / max(progress.train_seconds, 1e-9):.0f}",
                    **{label: f"{progress.last_stats[k]:{fmt}}" for k, (label, fmt) in objective.stats.items()
                       if k in progress.last_stats},
                    val=f"{progress.val_loss:.3f}" if progress.val_loss is not None else "-",
                )
                _after_step(session, objective, progress, bar.write)
                if progress.step == session.steps or progress.stop_reason:
                    break  # _finish writes the final checkpoint, even after a late Ctrl-C
                saved = bool(t.save_every) and progress.step % t.save_every == 0
                if saved:
                    save_checkpoint(session.run, session.model, session.optimizer, progress, session.adapter_cfg,
                                    t.keep_checkpoints)
                if dist.any_rank(interrupted.is_set()):  # every rank stops at the same step
                    _stop_interrupted(session, progress, saved)
    finally:
        bar.close()
    return _finish(session, objective, progress)


def train_step(session: Session, objective: Objective, progress: Progress) -> None:
    """One optimizer step over grad_accumulation micro-batches; refuses to apply a non-finite update."""
    t = session.recipe.train
    tic = time.perf_counter()
    grads_acc, step_loss, stats_acc = None, 0.0, {}
    with dist.rank_rng():
        for _ in range(t.grad_accumulation):
            items = objective.batches.next(progress)
            # With several ranks: this rank's slice of the global batch, weighted by its share.
            mine, weight = dist.shard_batch(items, objective.weights(items))
            loss, grads, stats = objective.loss_and_grad(session.model, mine, items)
            if weight != 1.0:
                loss, grads = loss * weight, _tree_scale(grads, weight)
                stats = {k: v * weight for k, v in stats.items()}
            grads_acc = grads if grads_acc is None else _tree_add(grads_acc, grads)
            stats_acc = {k: stats_acc[k] + v if k in stats_acc else v for k, v in stats.items()}
            step_loss += loss
            n_tok, n_sup = objective.counts(items)
            progress.tokens += n_tok
            progress.supervised_tokens += n_sup
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
        session.run.log_metrics({"step": progress.step + 1, "event": "diverged", "loss": str(loss_value),
                                 "grad_norm": str(norm_value)})
        raise TrainingDiverged(_divergence_message(session, progress.step + 1, loss_value, norm_value))
    session.optimizer.update(session.model, grads_acc)
    mx.eval(session.model.state, session.optimizer.state)
    progress.train_seconds += time.perf_counter() - tic
    progress.step += 1
    progress.last_loss = loss_value
    progress.last_stats = {k: v.item() / n for k, v in stats_acc.items()}
    for k, v in progress.last_stats.items():
        progress.window_stats[k] = progress.window_stats.get(k, 0.0) + v
    progress.window_loss, progress.window_n = progress.window_loss + loss_value, progress.window_n + 1
    progress.since_val_loss, progress.since_val_n = progress.since_val_loss + loss_value, progress.since_val_n + 1


def train_record(session: Session, progress: Progress) -> dict:
    """The metrics.jsonl line for the steps since the last one (with the objective's mean statistics)."""
    return {
        "step": progress.step,
        "train_loss": progress.window_loss / progress.window_n,
        **{k: v / progress.window_n for k, v in progress.window_stats.items()},
        "learning_rate": float(session.optimizer.learning_rate.item()),
        "tokens": progress.tokens,
        "supervised_tokens": progress.supervised_tokens,
        "tokens_per_sec": progress.tokens / progress.train_seconds,
        "supervised_tokens_per_sec": progress.supervised_tokens / progress.train_seconds,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        "elapsed_sec": progress.train_seconds,
    }


def _after_step(session: Session, objective: Objective, progress: Progress, write) -> None:
    """Metrics line every report_every steps; validation, best adapter and early stopping every val_every."""
    t = session.recipe.train
    last = progress.step == session.steps
    if progress.step % t.report_every == 0 or last:
        session.run.log_metrics(train_record(session, progress))
        progress.window_loss, progress.window_n, progress.window_stats = 0.0, 0, {}
    if objective.valid_set and (progress.step % t.val_every == 0 or last):
        _validate(session, objective, progress, write)


def validation_stats(session: Session, objective: Objective) -> dict[str, float]:
    """Mean loss and statistics on a fixed subset of the validation items (eval mode, no gradients),
    each rank scoring a slice of them."""
    t = session.recipe.train
    items = objective.valid_set
    n = len(items) if t.val_batches < 0 else min(len(items), t.batch_size * t.val_batches)
    session.model.eval()
    sums, weight = dist.validation_sums(objective.validation_sums, session.model, items[:n], t.batch_size,
                                        ("loss", *objective.stats))
    session.model.train()
    return {k: v / max(weight, 1) for k, v in sums.items()}


def _validate(session: Session, objective: Objective, progress: Progress, write) -> None:
    stats = validation_stats(session, objective)
    progress.val_loss = stats["loss"]
    extra = {f"val_{k}": stats[k] for k in objective.stats if k in stats}
    session.run.log_metrics({"step": progress.step, "val_loss": progress.val_loss, **extra})
    write(f"step {progress.step}: train loss {progress.last_loss:.3f}, validation loss {progress.val_loss:.3f}"
          + objective.describe(stats, "validation "))
    progress.history.append([progress.val_loss, progress.since_val_loss / max(progress.since_val_n, 1)])
    progress.since_val_loss, progress.since_val_n = 0.0, 0
    if progress.best_val_loss is None or progress.val_loss < progress.best_val_loss:
        progress.best_val_loss, progress.best_step = progress.val_loss, progress.step
        save_adapters(session.model, session.run.best_dir, session.adapter_cfg)
        session.config["best"] = {"step": progress.step, "val_loss": progress.val_loss, "path": str(session.run.best_dir),
                                  **extra}
        session.run.write_config(session.config)
    if overfitting(progress.history):
        recent = [h[0] for h in progress.history[-OVERFIT_RISES - 1 :]]
        session.run.log_metrics({"step": progress.step, "event": "overfitting", "val_losses": recent})
        write(
            f"warning: validation loss rose {OVERFIT_RISES} validations in a row while train loss fell: the model is "
            f"memorising the training rows (best adapter so far: step {progress.best_step}, kept in {session.run.best_dir})"
        )
    _early_stopping(session, progress, write)


def overfitting(history: list[list[float]]) -> bool:
    """True on the validation that completes OVERFIT_RISES rises in a row while train loss fell over them."""
    if len(history) < OVERFIT_RISES + 1:
        return False
    recent = history[-OVERFIT_RISES - 1 :]
    rising = all(b[0] > a[0] for a, b in zip(recent, recent[1:]))
    longer = len(history) > OVERFIT_RISES + 1 and history[-OVERFIT_RISES - 1][0] > history[-OVERFIT_RISES - 2][0]
    return rising and not longer and recent[-1][1] < recent[0][1]


def _early_stopping(session: Session, progress: Progress, write) -> None:
    """Stop after `patience` validations without beating the reference by min_delta."""
    t = session.recipe.train
    if progress.patience_ref is None or progress.val_loss < progress.patience_ref - t.early_stopping_min_delta:
        progress.patience_ref, progress.bad_evals = progress.val_loss, 0
        return
    progress.bad_evals += 1
    if t.early_stopping_patience and progress.bad_evals >= t.early_stopping_patience:
        progress.stop_reason = "early stopping"
        session.run.log_metrics({"step": progress.step, "event": "early_stop", "best_step": progress.best_step,
                                 "best_val_loss": progress.best_val_loss})
        write(
            f"early stopping at step {progress.step}: validation loss has not improved by {t.early_stopping_min_delta} "
            f"for {progress.bad_evals} validations; best {progress.best_val_loss:.4f} at step {progress.best_step} ({session.run.best_dir})"
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


def _stop_interrupted(session: Session, progress: Progress, saved: bool) -> None:
    t = session.recipe.train
    if not saved:
        save_checkpoint(session.run, session.model, session.optimizer, progress, session.adapter_cfg,
                                    t.keep_checkpoints)
    save_adapters(session.model, session.run.adapters, session.adapter_cfg)
    session.run.log_metrics({"step": progress.step, "event": "interrupted"})  # `mlxft runs`: resumable, not still running
    session.log(
        f"\ninterrupted at step {progress.step} of {session.steps}: checkpoint saved in {session.run.checkpoint(progress.step)}\n"
        f"resume with: mlxft train --resume {session.run.root}" + (" (and the same --hosts/--hostfile)" if dist.size() > 1 else "")
    )
    dist.finish_interrupted()
    raise KeyboardInterrupt


def _divergence_message(session: Session, step: int, loss: float, norm: float) -> str:
    t = session.recipe.train
    ckpt = latest_checkpoint(session.run)
    kept = f"the last good checkpoint is {ckpt}" if ckpt else f"no checkpoint was written yet (the first comes at step {t.save_every})"
    clip = f"lower train.max_grad_norm (now {t.max_grad_norm})" if t.max_grad_norm else "set train.max_grad_norm=1.0 (now off)"
    precision = session.config.get("base_model", {}).get("precision", "?")
    return (
        f"training diverged at step {step}: loss {loss}, gradient norm {norm}; the step was not applied and {kept}. "
        f"Likely causes, most likely first: learning rate too high (try train.learning_rate={t.learning_rate / 5:.2g}, "
        f"now {t.learning_rate}); {clip}; a broken row in train.jsonl (empty, or extremely long); "
        f"fp16 overflow (the base is {precision}: use a bf16 or fp32 base). Change one and start a new run"
    )


def _finish(session: Session, objective: Objective, progress: Progress) -> TrainResult:
    """The end of a run: final adapters, final checkpoint (marked finished), the result in config.json."""
    stopped_early = progress.stop_reason == "early stopping"
    progress.stop_reason = progress.stop_reason or "done"
    save_adapters(session.model, session.run.adapters, session.adapter_cfg)
    save_checkpoint(session.run, session.model, session.optimizer, progress, session.adapter_cfg, session.recipe.train.keep_checkpoints)
    seconds = max(progress.train_seconds, 1e-9)
    result = TrainResult(
        run=session.run,
        steps=progress.step,
        final_train_loss=progress.last_loss,
        final_val_loss=progress.val_loss,
        seconds=progress.train_seconds,
        supervised_tokens_per_sec=progress.supervised_tokens / seconds,
        tokens_per_sec=progress.tokens / seconds,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        best_val_loss=progress.best_val_loss,
        best_step=progress.best_step,
        stopped_early=stopped_early,
    )
    session.config["result"] = {k: v for k, v in result.__dict__.items() if k != "run"}
    if progress.last_stats:
        session.config["result"]["last_stats"] = progress.last_stats
    session.config["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    session.run.write_config(session.config)
    label = "" if objective.name == "train" else f"{objective.name.upper()} "
    session.log(
        f"done: {progress.step} {label}steps in {progress.train_seconds:.0f}s, {result.tokens_per_sec:.0f} tokens/s "
        f"({result.supervised_tokens_per_sec:.1f} supervised/s), peak memory {result.peak_memory_gb:.2f} GB"
        + objective.describe(progress.last_stats, "last step: ")
        + f"; adapters in {session.run.adapters}" + (f" (best: {session.run.best_dir}, step {progress.best_step})" if progress.best_step else "")
    )
    return result


def _tree_add(a, b):
    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, factor):
    return tree_map(lambda x: x * factor, a)
