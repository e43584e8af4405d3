"""What a run folder says about itself: metrics curves, status, key figures, eval headline.

    mlxft runs [--runs-dir D]

Read-only over RUN/config.json, RUN/metrics.jsonl, RUN/eval.json and RUN/checkpoints/; used by
`mlxft runs`, `mlxft runs compare A B` (mlxft/runs/compare.py) and `mlxft report RUN`. Imports no
mlx, so listing a folder of runs is fast.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlxft.errors import MlxftError
from mlxft.runs.format import check_run_config
from mlxft.runs.run import RunDir, read_json_object

_STEP_DIR = re.compile(r"^step-(\d+)$")
PREFERENCE_KEYS = ("reward_margin", "preference_accuracy", "chosen_logp", "rejected_logp")
# What a GRPO run logs per step besides the loss (mlxft/training/grpo.py); plus "reward/<name>" per reward.
REWARD_KEYS = ("reward", "reward_std", "kl", "completion_length", "clip_fraction", "no_signal")
# Validation loss must end this much (relative) above its minimum before we call it overfitting:
# below that, the rise is validation noise on a few batches.
OVERFIT_TOLERANCE = 0.02


@dataclass
class Metrics:
    """RUN/metrics.jsonl split by kind of line, each list in step order."""

    train: list[dict] = field(default_factory=list)  # lines with train_loss
    val: list[dict] = field(default_factory=list)  # lines with val_loss
    events: list[dict] = field(default_factory=list)  # lines with event

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` over the train lines that carry it."""
        pts = [(m["step"], m[key]) for m in self.train if isinstance(m.get(key), (int, float))]
        return [s for s, _ in pts], [v for _, v in pts]

    def has(self, key: str) -> bool:
        return any(isinstance(m.get(key), (int, float)) for m in self.train)

    def last(self, key: str):
        for m in reversed(self.train):
            if key in m:
                return m[key]
        return None


def read_metrics(run: RunDir) -> Metrics:
    """Parse metrics.jsonl; a half-written last line (a killed run) is skipped, any other bad line is an error."""
    out = Metrics()
    if not run.metrics.is_file():
        return out
    lines = run.metrics.read_text(errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                continue  # the writer was killed mid-line
            raise MlxftError(f"{run.metrics}:{n}: not a JSON object ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise MlxftError(f"{run.metrics}:{n}: expected an object with an integer 'step'")
        if "event" in rec:
            out.events.append(rec)
        elif "val_loss" in rec:
            out.val.append(rec)
        elif "train_loss" in rec or any(k in rec for k in PREFERENCE_KEYS + REWARD_KEYS):
            out.train.append(rec)
    for lst in (out.train, out.val, out.events):
        lst.sort(key=lambda m: m["step"])
    return out


def open_run(path: str | Path) -> RunDir:
    """RunDir.open with a clear message for a missing folder or a folder that is not a run."""
    p = Path(path)
    if not p.exists():
        raise MlxftError(f"{p} does not exist")
    if not p.is_dir():
        raise MlxftError(f"{p} is a file, not a run folder")
    return RunDir.open(p)


def read_config(run: RunDir) -> dict:
    config = read_json_object(run.config)
    check_run_config(config, run.config)  # another mlxft's newer run format: refused, naming both versions
    return config


def read_eval(run: RunDir) -> dict | None:
    """eval.json in the version-2 shape (docs: eval-schema), or None when the run has none.

    A version-1 file (one exact-match comparison, written by older `mlxft eval`/`--compare`)
    is shown as a single suite so old runs still get their table.
    """
    if not run.eval_json.is_file():
        return None
    data = read_json_object(run.eval_json)
    if "suites" in data:
        _check_eval(data, run.eval_json)
        return data
    if {"base", "adapter"} <= set(data):
        split = data.get("split", "test")
        scorer = {
            "name": data.get("scorer", "exact_match"),
            "higher_is_better": True,
            "unit": "fraction",
            "values": {"base": data["base"], "adapter": data["adapter"]},
            "delta": data.get("delta", data["adapter"] - data["base"]),
            "gate": None,
            "details": {},
        }
        failures = [
            {"prompt": "", "reference": e.get("reference", ""), "base": e.get("base", ""), "adapter": e.get("adapter", ""),
             "scorer": scorer["name"]}
            for e in data.get("examples", []) if e.get("adapter", "").strip().rstrip(".") != e.get("reference", "").strip().rstrip(".")
        ][:10]
        return {"version": 1, "passed": None, "suites": {
            f"{split} split": {"description": f"exact match on the run's {split} split", "n": data.get("n"),
                               "seconds": data.get("seconds", {}), "scorers": [scorer], "failures": failures}}}
    raise MlxftError(f"{run.eval_json} has neither 'suites' nor base/adapter scores: not an mlxft eval.json")


def _check_eval(data: dict, path: Path) -> None:
    """The parts of the eval.json contract that the report and `mlxft runs` rely on, or one clear error."""
    if not isinstance(data["suites"], dict):
        raise MlxftError(f"{path}: 'suites' must be an object of suite name -> results")
    for name, suite in data["suites"].items():
        where = f"{path}: suites.{name}"
        if not isinstance(suite, dict) or not isinstance(suite.get("scorers", []), list):
            raise MlxftError(f"{where} must be an object with a 'scorers' list")
        for i, sc in enumerate(suite.get("scorers", [])):
            if not isinstance(sc, dict) or not isinstance(sc.get("name"), str) or not isinstance(sc.get("values"), dict):
                raise MlxftError(f"{where}.scorers[{i}] needs a 'name' and a 'values' object (e.g. base, adapter)")
            bad_values = [k for k, v in sc["values"].items() if v is not None and not isinstance(v, (int, float))]
            if bad_values or (sc.get("delta") is not None and not isinstance(sc["delta"], (int, float))):
                raise MlxftError(f"{where}.scorers[{i}]: values and delta must be numbers or null "
                                 f"(not: {', '.join(bad_values) or 'delta'})")
            if sc.get("gate") is not None and not isinstance(sc["gate"], dict):
                raise MlxftError(f"{where}.scorers[{i}].gate must be an object with 'rule' and 'passed', or null")


def checkpoint_steps(run: RunDir) -> list[tuple[int, Path]]:
    if not run.checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.checkpoints.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def run_status(run: RunDir, config: dict, metrics: Metrics) -> str:
    """finished | running | interrupted | failed-resumable | diverged | failed.

    interrupted: stopped with Ctrl-C (checkpointed; `mlxft train --resume RUN`).
    failed-resumable: ended without a clean stop (killed, crashed, out of memory) after a checkpoint.
    diverged: stopped by a non-finite loss; resuming would replay the same step, so start a new run.
    failed: ended before its first checkpoint. A run without a clean stop whose metrics were
    written in the last two minutes is taken to be still training.
    """
    if config.get("finished"):
        return "finished"
    last_event = metrics.events[-1] if metrics.events else None
    kind = last_event.get("event") if last_event else None
    if kind == "diverged":
        return "diverged"
    ckpts = checkpoint_steps(run)
    if kind == "interrupted" and all(m["step"] <= last_event["step"] for m in metrics.train):
        return "interrupted" if ckpts else "failed"
    if run.metrics.is_file() and time.time() - run.metrics.stat().st_mtime < 120:
        return "running"
    return "failed-resumable" if ckpts else "failed"


def status_hint(status: str, run_root: Path) -> str:
    """What to do about a run in this status, as one sentence (empty when nothing is needed)."""
    return {
        "running": "still training (metrics written in the last two minutes)",
        "interrupted": f"stopped with Ctrl-C; continue with: mlxft train --resume {run_root}",
        "failed-resumable": f"ended without a clean stop after a checkpoint; continue with: mlxft train --resume {run_root}",
        "diverged": "stopped on a non-finite loss; start a new run with a lower learning rate",
        "failed": "ended before its first checkpoint; start a new run",
    }.get(status, "")


# ---------------------------------------------------------------- key figures


def overfitting_spans(metrics: Metrics) -> list[dict]:
    """Where validation loss rose while training loss fell, from the curves themselves.

    After the lowest validation loss, if the last validation ends more than OVERFIT_TOLERANCE
    above it over at least two later validations, and the mean training loss after the minimum
    is below the training loss at the minimum, that span is returned.
    """
    val = metrics.val
    if len(val) < 3:
        return []
    i_best = min(range(len(val)), key=lambda i: val[i]["val_loss"])
    best, last = val[i_best], val[-1]
    if len(val) - 1 - i_best < 2 or last["val_loss"] <= best["val_loss"] * (1 + OVERFIT_TOLERANCE):
        return []
    before = [m["train_loss"] for m in metrics.train if m["step"] <= best["step"] and "train_loss" in m]
    after = [m["train_loss"] for m in metrics.train if m["step"] > best["step"] and "train_loss" in m]
    if not before or not after or sum(after) / len(after) >= before[-1]:
        return []
    return [{
        "from_step": best["step"], "to_step": last["step"],
        "val_from": best["val_loss"], "val_to": last["val_loss"],
        "train_from": before[-1], "train_to": after[-1],
    }]


def eval_headline(ev: dict | None) -> dict | None:
    """The first scorer of the first suite (the task's main figure) and the gate count over all suites."""
    if not ev or not ev.get("suites"):
        return None
    name, suite = next(iter(ev["suites"].items()))
    scorers = suite.get("scorers") or []
    gates = [s["gate"] for su in ev["suites"].values() for s in (su.get("scorers") or []) if s.get("gate")]
    head = scorers[0] if scorers else None
    return {
        "suite": name,
        "scorer": head["name"] if head else None,
        "unit": head.get("unit", "score") if head else None,
        "base": head["values"].get("base") if head else None,
        "adapter": head["values"].get("adapter") if head else None,
        "delta": head.get("delta") if head else None,
        "gates_passed": sum(bool(g.get("passed")) for g in gates),
        "gates": len(gates),
        "passed": ev.get("passed"),
    }


@dataclass
class RunSummary:
    """Key figures of one run, as `mlxft runs` lists them."""

    path: Path
    name: str
    recipe: str
    started: str | None
    status: str
    steps_done: int | None
    steps_total: int | None
    train_loss: float | None
    val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    tokens_per_sec: float | None
    supervised_tokens_per_sec: float | None
    peak_memory_gb: float | None
    eval: dict | None
    overfitting: bool


def summarize(path: str | Path, require_metrics: bool = False) -> RunSummary:
    """Key figures of the run at `path` (raises MlxftError for a folder that is not a run)."""
    run = open_run(path)
    cfg = read_config(run)
    metrics = read_metrics(run)
    if require_metrics and not metrics.train:
        raise MlxftError(
            f"{run.root} has no training metrics yet ({run.metrics.name} is missing or has no step lines): "
            "nothing to report until the first train.report_every steps have run"
        )
    val = metrics.val
    best = min(val, key=lambda m: m["val_loss"]) if val else None
    recipe = cfg.get("recipe", {}) if isinstance(cfg.get("recipe"), dict) else {}
    steps_done = max([m["step"] for m in metrics.train + metrics.val], default=None)
    return RunSummary(
        path=run.root,
        name=run.root.name,
        recipe=recipe.get("name", "?"),
        started=cfg.get("started"),
        status=run_status(run, cfg, metrics),
        steps_done=steps_done,
        steps_total=cfg.get("steps"),
        train_loss=metrics.last("train_loss"),
        val_loss=val[-1]["val_loss"] if val else None,
        best_val_loss=best["val_loss"] if best else None,
        best_step=best["step"] if best else None,
        tokens_per_sec=metrics.last("tokens_per_sec"),
        supervised_tokens_per_sec=metrics.last("supervised_tokens_per_sec"),
        peak_memory_gb=max(metrics.series("peak_memory_gb")[1], default=None),
        eval=eval_headline(read_eval(run)),
        overfitting=bool(overfitting_spans(metrics)) or any(e.get("event") == "overfitting" for e in metrics.events),
    )


def list_runs(runs_dir: str | Path | None = None) -> list[RunSummary | tuple[Path, str]]:
    """Every run under `runs_dir` (default $MLXFT_RUNS or ./runs), oldest first.

    A folder with a config.json that cannot be read is listed as (path, problem) so one broken
    run does not hide the others.
    """
    root = Path(runs_dir or os.environ.get("MLXFT_RUNS") or "runs")
    if not root.is_dir():
        raise MlxftError(f"no runs folder at {root} (train first, or pass --runs-dir)")
    out: list = []
    for p in sorted(root.iterdir()):
        if not (p / "config.json").is_file():
            continue
        try:
            out.append(summarize(p))
        except MlxftError as e:
            out.append((p, str(e)))
    out.sort(key=lambda r: (r.started or "", r.name) if isinstance(r, RunSummary) else ("", r[0].name))
    return out


# ---------------------------------------------------------------- formatting for the terminal


def fmt_num(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def fmt_score(value, unit: str | None) -> str:
    """A scorer value as people read it: fractions as percent, perplexity with 2 decimals."""
    if value is None:
        return "-"
    if unit == "fraction":
        return f"{100 * value:.1f}%"
    if unit == "ppl":
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_delta(delta, unit: str | None) -> str:
    if delta is None:
        return "-"
    if unit == "fraction":
        return f"{100 * delta:+.1f} pts"
    return f"{delta:+.2f}" if unit == "ppl" else f"{delta:+.3f}"


def headline_text(e: dict | None) -> str:
    if not e or not e.get("scorer"):
        return "-"
    return (f"{e['suite']} {e['scorer']} {fmt_score(e['base'], e['unit'])} -> {fmt_score(e['adapter'], e['unit'])}"
            f" ({fmt_delta(e['delta'], e['unit'])})")


def gates_text(e: dict | None) -> str:
    if not e or not e["gates"]:
        return "-"
    return f"{e['gates_passed']}/{e['gates']} pass" + ("" if e["gates_passed"] == e["gates"] else " FAIL")


def format_run_list(rows: list) -> str:
    """The `mlxft runs` table."""
    header = ["run", "recipe", "started", "steps", "train", "val", "best val", "tok/s", "eval", "gates", "status"]
    table = [header]
    for r in rows:
        if not isinstance(r, RunSummary):
            path, problem = r
            table.append([path.name, "-", "-", "-", "-", "-", "-", "-", "-", "-", f"unreadable: {problem}"])
            continue
        steps = f"{r.steps_done if r.steps_done is not None else 0}/{r.steps_total or '?'}"
        best = f"{fmt_num(r.best_val_loss)}@{r.best_step}" if r.best_val_loss is not None else "-"
        status = r.status + (" (overfit)" if r.overfitting else "")
        if r.steps_done is None and r.status in ("failed", "running"):
            status += " (no metrics yet)"
        table.append([
            r.name, r.recipe, (r.started or "-").replace("T", " ")[:16], steps, fmt_num(r.train_loss), fmt_num(r.val_loss),
            best, fmt_num(r.tokens_per_sec, 0), headline_text(r.eval), gates_text(r.eval), status,
        ])
    return columns(table)


def columns(table: list[list[str]]) -> str:
    """Left-aligned text columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


# ---------------------------------------------------------------- helpers


def flatten(d, prefix: str = "") -> dict:
    """{"train": {"iters": 5}} -> {"train.iters": 5}; lists stay values."""
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
