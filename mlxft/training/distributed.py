"""Data-parallel training on MLX's own engine: `mlx.launch` starts the ranks, `mx.distributed` connects them.

Run it as

    mlxft train RECIPE --hosts 10.0.0.1,10.0.0.2        # mlxft runs mlx.launch for you (launch.py)
    mlxft train RECIPE --hostfile hosts.json            # mlx.launch's JSON hostfile
    mlx.launch --hostfile hosts.json -- mlxft train RECIPE   # or launch it yourself

Every rank loads the same base and data and walks the same deterministic order of *global*
batches (train.batch_size rows). Rank r trains on its contiguous slice of each global batch;
its gradient is weighted by its share of the batch's supervised tokens and the weighted
gradients are averaged with mlx's `average_gradients`, so N ranks x B/N rows take the same
step as one process with B rows (up to float rounding). Only rank 0 writes the run folder.
A checkpoint therefore holds the global data position and resumes on any rank count that
divides the batch. A rank that dies makes the others stop with one clear message: the ring
backend reports a lost peer, mlx.launch stops the rest, and a watchdog ends a rank that has
waited longer than MLXFT_DIST_TIMEOUT seconds (default 600) for the others during training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_unflatten

from mlxft import rank as ranks
from mlxft.errors import ConfigError, MlxftError
from mlxft.rank import is_main, rank, size
from mlxft.runs.run import RunDir
from mlxft.training.checkpoint import latest_checkpoint, load_checkpoint as load_local, restore_rng
from mlxft.training.progress import Progress

# Longest a rank waits inside a collective before concluding another rank is gone. It covers
# rank 0 writing a checkpoint while the others wait at the next step, so it is generous.
DEFAULT_TIMEOUT_S = 600.0

_run_root: Path | None = None  # for the "last checkpoint" hint in failure messages


class RankLost(MlxftError):
    """Another rank exited, hung or became unreachable; this rank stopped too."""


# ---------------------------------------------------------------- who am I


def init() -> int:
    """Join the distributed group mlx.launch (or mpirun) set up; return the number of ranks.

    A plain process gets a group of one and nothing else changes. In a group of several,
    ranks other than 0 stay quiet (errors still go to stderr), SIGTERM from the launcher
    becomes a clear error, and the wait watchdog starts.
    """
    first = not ranks.joined()
    group = ranks.world()
    if first and group.size() > 1:
        _install_rank_handlers(group)
    return group.size()


def _install_rank_handlers(group) -> None:
    timeout = _timeout()
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # progress and logs come from rank 0 only
        os.environ["TQDM_DISABLE"] = "1"
    elif hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # mlx.launch relays a pipe: show lines as they come
    if threading.current_thread() is threading.main_thread():
        # mlxft's launcher starts mlx.launch with Ctrl-C ignored (so it keeps relaying output);
        # the ranks take it back: the training loop checkpoints on Ctrl-C.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_sigterm)
    _WATCHDOG.start(timeout)


def _timeout() -> float:
    value = os.environ.get("MLXFT_DIST_TIMEOUT") or str(DEFAULT_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"MLXFT_DIST_TIMEOUT={value!r}: expected a positive number of seconds")
    return seconds


def _stopping() -> None:
    """This rank is failing with a message: a further SIGTERM from the launcher must not interrupt
    printing it or the exit (the process ends on its own right after)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _on_sigterm(signum, frame):
    _stopping()
    raise RankLost(
        f"rank {rank()}: stopped by the launcher (another rank exited or the job was stopped); {_resume_hint()}"
    )


def _resume_hint() -> str:
    if _run_root is None:
        return "no run folder was created yet"
    if not is_main():
        return f"checkpoints are in rank 0's {_run_root}/checkpoints"
    ckpt = latest_checkpoint(RunDir(_run_root))
    if ckpt is None:
        return f"no checkpoint was written yet in {_run_root}: start the run again"
    return f"the last checkpoint is {ckpt}; resume with: mlxft train --resume {_run_root} (and the same --hosts/--hostfile)"


# ---------------------------------------------------------------- collectives


class _Watchdog:
    """Ends the process when a collective has waited longer than the timeout.

    A collective blocks inside mlx's C++ code, where neither exceptions nor signal handlers
    reach it, so a frozen or unreachable peer would hang the rank forever; this thread is the
    way out. It is armed only while a rank waits for the others, never during its own compute.
    """

    def __init__(self):
        self.timeout = DEFAULT_TIMEOUT_S
        self._since: float | None = None
        self._what = ""
        self._thread: threading.Thread | None = None

    def start(self, timeout: float) -> None:
        self.timeout = timeout
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="mlxft-dist-watchdog", daemon=True)
            self._thread.start()

    @contextlib.contextmanager
    def waiting(self, what: str):
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout:
                sys.__stderr__.write(
                    f"mlxft: error: rank {rank()}: waited {self.timeout:.0f} s for the other ranks during {self._what}; "
                    f"one of them died, hung or cannot be reached (set MLXFT_DIST_TIMEOUT to wait longer). "
                    f"Stopping; {_resume_hint()}\n"
                )
                sys.__stderr__.flush()
                os._exit(1)


_WATCHDOG = _Watchdog()


def _wait(what: str, *arrays, watched: bool = True) -> None:
    """Evaluate collective results; a lost peer becomes a RankLost with a resume hint.

    Set-up broadcasts are not watched: a machine may take long to load or convert its base model
    the first time, and a dead peer still shows as a lost connection there.
    """
    with _WATCHDOG.waiting(what) if watched else contextlib.nullcontext():
        try:
            mx.eval(*arrays)
        except RuntimeError as e:
            _stopping()
            raise RankLost(
                f"rank {rank()}: lost the connection to another rank during {what} ({e}); "
                f"it probably exited (see its message above). {_resume_hint()}"
            ) from None


def finish_interrupted() -> None:
    """After an agreed Ctrl-C, once rank 0's checkpoint is on disk: no rank leaves before that
    (a barrier), and a SIGTERM from the launcher (it stops the others as soon as one rank exits)
    is ignored: this rank is already exiting with 130. (SIG_IGN, not a Python handler: Python
    resets its own handlers to the default during shutdown, where a late SIGTERM would kill.)"""
    if size() == 1:
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    any_rank(True)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if size() == 1:
        return flag
    total = mx.distributed.all_sum(mx.array([int(flag)], dtype=mx.int32))
    _wait("the stop check", total)
    return total.item() > 0


def _broadcast_json(obj=None):
    """Rank 0's JSON-able object on every rank (the others pass None)."""
    data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8) if is_main() else np.zeros(0, np.uint8)
    n = mx.distributed.all_sum(mx.array([data.size], dtype=mx.int64))
    _wait("a broadcast from rank 0", n, watched=False)
    buf = np.zeros(n.item(), np.uint8)
    buf[: data.size] = data
    out = mx.distributed.all_sum(mx.array(buf))
    _wait("a broadcast from rank 0", out, watched=False)
    return json.loads(bytes(np.array(out)).decode())


_UINT = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def _broadcast_arrays(flat: list | None) -> list:
    """Rank 0's [(name, array)] on every rank, bit for bit (summed as unsigned ints with zeros)."""
    header = _broadcast_json([[k, list(v.shape), str(v.dtype).rsplit(".", 1)[-1]] for k, v in flat] if is_main() else None)
    mine = dict(flat or [])
    out = []
    for name, shape, dtype_name in header:
        dtype = getattr(mx, dtype_name)
        x = mine[name] if is_main() else mx.zeros(shape, dtype)
        bits = mx.distributed.all_sum(mx.view(x.reshape(-1), _UINT[dtype.size]))
        out.append((name, mx.view(bits, dtype).reshape(shape)))
    _wait("a broadcast from rank 0", [v for _, v in out], watched=False)
    return out


def on_main(fn, *args):
    """Run fn on rank 0 only and hand its JSON-able result (or its MlxftError) to every rank."""
    if init() == 1:
        return fn(*args)
    if not is_main():
        reply = _broadcast_json()
        if "error" in reply:
            raise MlxftError(f"rank 0: {reply['error']}")
        return reply["ok"]
    try:
        result = fn(*args)
    except MlxftError as e:
        _broadcast_json({"error": str(e)})
        raise
    _broadcast_json({"ok": result})
    return result


# ---------------------------------------------------------------- training hooks


def check_batch_size(batch_size: int) -> None:
    if batch_size % size():
        raise ConfigError(
            f"train.batch_size={batch_size} is not divisible by the {size()} ranks: the global batch is split "
            f"evenly across ranks (use a multiple of {size()})"
        )


def shard_batch(items: list, weights: list[float]) -> tuple[list, float]:
    """This rank's slice of a global batch and its gradient weight.

    `weights`: each item's weight in the batch's mean loss (SFT: its supervised tokens; a
    preference pair: 1). The weight is N x (this slice's share of the total), so averaging the
    weighted per-rank mean-loss gradients over N ranks gives the gradient of the batch's mean:
    the same step one process takes on the whole batch. Every rank holds the whole batch, so
    the shares need no communication.
    """
    if size() == 1:
        return items, 1.0
    total = sum(weights)
    per = len(items) // size()
    lo, hi = rank() * per, (rank() + 1) * per
    return items[lo:hi], (size() * sum(weights[lo:hi]) / total if total else 0.0)


def reduce_step(grads, loss, stats: dict):
    """Average the weighted gradients, losses and statistics over ranks (mlx's average_gradients:
    one all-reduce per 32 MB of gradients). Local compute finishes first, so the watchdog times
    only the wait for the other ranks."""
    if size() == 1:
        return grads, loss, stats
    mx.eval(grads, loss, stats)
    grads = average_gradients(grads)
    loss = mx.distributed.all_sum(loss) / size()
    stats = {k: mx.distributed.all_sum(v) / size() for k, v in stats.items()}
    _wait("the gradient all-reduce", grads, loss, stats)
    return grads, loss, stats


@contextlib.contextmanager
def rank_rng():
    """Each rank draws dropout from its own key for a step; all return to one shared key after.

    Without it every rank would draw identical dropout masks. The shared key is the same on all
    ranks at every step boundary, so rank 0's checkpoint restores all of them (bit-identical resume).
    """
    if size() == 1:
        yield
        return
    keys = mx.random.split(mx.random.state[0], size() + 1)
    _set_key(keys[1 + rank()])
    try:
        yield
    finally:
        _set_key(keys[0])


def _set_key(key) -> None:
    hi, lo = key.tolist()
    mx.random.seed((hi << 32) | lo)  # seeding with a key's 64-bit value sets that key


def validation_sums(evaluate, model, items: list, batch_size: int, keys) -> tuple[dict[str, float], float]:
    """`evaluate(model, items, batch_size)`'s weighted sums (of `keys`) and total weight over all
    `items`, each rank scoring a slice of them (at batch_size / N)."""
    if size() == 1:
        return evaluate(model, items, batch_size)
    per = -(-len(items) // size())
    mine = items[rank() * per : (rank() + 1) * per]
    sums, weight = evaluate(model, mine, max(batch_size // size(), 1)) if mine else ({}, 0.0)
    total = mx.distributed.all_sum(mx.array([sums.get(k, 0.0) for k in keys] + [float(weight)], dtype=mx.float32))
    _wait("validation", total)
    values = total.tolist()
    return dict(zip(keys, values[:-1])), values[-1]


def create_run(recipe_name: str, root: Path | None):
    """Rank 0 creates the run folder; the others learn its path (they never write to it)."""
    global _run_root
    path = on_main(lambda: str(RunDir.create(recipe_name, root).root))
    _run_root = Path(path)
    return RunDir(_run_root)


def remember_run(root: Path) -> None:
    global _run_root
    _run_root = Path(root)


def check_same_start(config: dict, model) -> None:
    """Refuse to train when ranks differ in data, base or software; then start from rank 0's weights.

    Each machine reads its own copy of the data and base; a silent difference would make the
    ranks train on different batches or drift apart.
    """
    if size() == 1:
        return
    mine = {
        "data sha256": config["data"]["sha256"],
        "data rows": config["data"]["rows"],
        "base model": [config["base_model"]["source"], config["base_model"]["precision"], config["total_parameters"]],
        "trainable parameters": config["trainable_parameters"],
        # The libraries that compute the step; Python and numpy may differ between machines.
        "mlx/mlx-lm/mlxft versions": {k: config["versions"].get(k) for k in ("mlx", "mlx-lm", "mlxft")},
    }
    reference = _broadcast_json(mine if is_main() else None)
    differ = [k for k in mine if json.dumps(mine[k], sort_keys=True) != json.dumps(reference[k], sort_keys=True)]
    if any_rank(bool(differ)):
        if differ:
            found = "; ".join(f"{k} ({mine[k]} here, {reference[k]} on rank 0)" for k in differ)
            raise ConfigError(
                f"rank {rank()} differs from rank 0 in: {found}. "
                "Every machine needs the same data, base model and mlxft/mlx versions at the same paths"
            )
        raise ConfigError(
            "another rank's data, base model or versions differ from rank 0's (see its message); nothing trained"
        )
    model.load_weights(_broadcast_arrays(tree_flatten(model.trainable_parameters()) if is_main() else None), strict=False)


def load_checkpoint(path: Path, model, optimizer):
    """Rank 0 reads the checkpoint; every rank gets its weights, optimizer state, RNG and position."""
    if size() == 1:
        return load_local(path, model, optimizer)
    progress = load_local(path, model, optimizer) if is_main() else None
    state = _broadcast_json(dataclasses.asdict(progress) if is_main() else None)
    weights = _broadcast_arrays(tree_flatten(model.trainable_parameters()) if is_main() else None)
    moments = _broadcast_arrays(tree_flatten(optimizer.state) if is_main() else None)
    if is_main():
        return progress
    model.load_weights(weights, strict=False)
    optimizer.state = tree_unflatten(moments)
    optimizer.init(model.trainable_parameters())
    progress = Progress(**state)
    restore_rng(progress.rng)
    return progress
