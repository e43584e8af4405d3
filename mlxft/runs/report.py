"""`mlxft report RUN`: one self-contained RUN/report.html (inline CSS, plots as base64 PNG).

    mlxft report runs/smollm2-135m-20261123-120000

The page holds the run card (recipe, resolved config, versions, data and template hashes,
machine, seed), loss / throughput / memory curves drawn by matplotlib, the eval tables from
eval.json, the worst failures, and an overfitting warning. It loads nothing from the network.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import io
import json
import re
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

import mlxft

from mlxft.errors import MlxftError
from mlxft.files import write_atomic
from mlxft.runs.summary import (
    Metrics, PREFERENCE_KEYS, flatten, fmt_delta, fmt_num, fmt_score, open_run, overfitting_spans, read_config, read_eval, read_metrics, status_hint, summarize,
)

TEMPLATE = "report.html.j2"


# ---------------------------------------------------------------- plots


def _png(fig) -> str:
    """A matplotlib figure as a data: URI (PNG, base64), then closed."""
    import matplotlib.pyplot as plt  # lazy: matplotlib (~1 s to import) loads only to draw

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(title: str, ylabel: str):
    import matplotlib  # lazy: matplotlib (~1 s to import) loads only to draw

    matplotlib.use("Agg")  # no display: files only; lazy: must come before pyplot's import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.3))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _mark_events(ax, metrics: Metrics) -> None:
    for e in metrics.events:
        kind = e.get("event")
        color = {"resumed": "tab:gray", "overfitting": "tab:red", "early_stop": "tab:purple", "diverged": "black"}.get(kind)
        if color:
            ax.axvline(e["step"], color=color, linestyle=":", linewidth=1)
            ax.annotate(kind, (e["step"], 1), xycoords=("data", "axes fraction"), fontsize=7, color=color,
                        rotation=90, va="top", ha="right")


def plot_loss(metrics: Metrics, overfit: list[dict]) -> str:
    fig, ax = _figure("Loss", "loss")
    steps, loss = metrics.series("train_loss")
    ax.plot(steps, loss, label="train", color="tab:blue")
    if metrics.val:
        vs = [m["step"] for m in metrics.val]
        vl = [m["val_loss"] for m in metrics.val]
        ax.plot(vs, vl, "o-", label="validation", color="tab:orange", markersize=4)
        best = min(metrics.val, key=lambda m: m["val_loss"])
        ax.plot([best["step"]], [best["val_loss"]], "*", color="tab:green", markersize=12, label=f"best (step {best['step']})")
    for span in overfit:
        ax.axvspan(span["from_step"], span["to_step"], color="tab:red", alpha=0.08, label="val rising, train falling")
    _mark_events(ax, metrics)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_throughput(metrics: Metrics) -> str | None:
    if not metrics.has("tokens_per_sec"):
        return None
    fig, ax = _figure("Throughput", "all tokens / s")
    ax.plot(*metrics.series("tokens_per_sec"), label="all tokens", color="tab:blue")
    ax.set_ylim(bottom=0)
    if metrics.has("supervised_tokens_per_sec"):  # ~30x fewer: its own axis, or it is a flat line at 0
        ax2 = ax.twinx()
        ax2.plot(*metrics.series("supervised_tokens_per_sec"), label="supervised tokens", color="tab:green")
        ax2.set_ylabel("supervised tokens / s")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=8, loc="lower right")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def plot_memory(metrics: Metrics) -> str | None:
    if not metrics.has("peak_memory_gb"):
        return None
    fig, ax = _figure("Peak memory", "GB")
    ax.plot(*metrics.series("peak_memory_gb"), color="tab:purple")
    ax.set_ylim(bottom=0)
    return _png(fig)


def plot_learning_rate(metrics: Metrics) -> str | None:
    if not metrics.has("learning_rate"):
        return None
    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(*metrics.series("learning_rate"), color="tab:brown")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _png(fig)


def plot_preference(metrics: Metrics) -> str | None:
    """Reward margin and preference accuracy of preference-tuning runs (DPO-style), when logged."""
    if not any(metrics.has(k) for k in PREFERENCE_KEYS):
        return None
    fig, ax = _figure("Preference tuning", "reward margin")
    val = {k: [(m["step"], m[f"val_{k}"]) for m in metrics.val if isinstance(m.get(f"val_{k}"), (int, float))]
           for k in ("reward_margin", "preference_accuracy")}
    if metrics.has("reward_margin"):
        ax.plot(*metrics.series("reward_margin"), color="tab:blue", label="reward margin (train)")
    if val["reward_margin"]:
        ax.plot(*zip(*val["reward_margin"]), "o--", color="tab:blue", markersize=4, label="reward margin (validation)")
    if metrics.has("preference_accuracy") or val["preference_accuracy"]:
        ax2 = ax.twinx()
        if metrics.has("preference_accuracy"):
            ax2.plot(*metrics.series("preference_accuracy"), color="tab:green", label="accuracy (train)")
        if val["preference_accuracy"]:
            ax2.plot(*zip(*val["preference_accuracy"]), "o--", color="tab:green", markersize=4, label="accuracy (validation)")
        ax2.set_ylabel("preference accuracy")
        ax2.set_ylim(0, 1.05)
        ax2.legend(fontsize=8, loc="lower right")
    for key, color in (("chosen_logp", "tab:olive"), ("rejected_logp", "tab:red")):
        if metrics.has(key) and not metrics.has("reward_margin"):
            ax.plot(*metrics.series(key), color=color, label=key)
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def plot_rewards(metrics: Metrics) -> str | None:
    """GRPO: mean reward (and each reward's mean), validation reward, KL and completion length, when logged."""
    if not metrics.has("reward"):
        return None
    fig, ax = _figure("GRPO rewards", "reward")
    ax.plot(*metrics.series("reward"), color="tab:blue", label="reward (train, mean of the samples)")
    names = sorted({k for m in metrics.train for k in m if k.startswith("reward/")})
    for name, color in zip(names, ("tab:cyan", "tab:olive", "tab:purple", "tab:brown", "tab:pink")):
        ax.plot(*metrics.series(name), color=color, linewidth=0.8, label=name[7:])
    val = [(m["step"], m["val_reward"]) for m in metrics.val if isinstance(m.get("val_reward"), (int, float))]
    if val:
        ax.plot(*zip(*val), "o--", color="tab:blue", markersize=4, label="reward (validation, greedy)")
    if metrics.has("kl"):
        ax2 = ax.twinx()
        ax2.plot(*metrics.series("kl"), color="tab:red", linewidth=0.8, label="KL to the base")
        ax2.set_ylabel("KL")
        ax2.legend(fontsize=8, loc="lower right")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def make_plots(metrics: Metrics, overfit: list[dict]) -> list[dict]:
    """[{title, src, alt}] for every curve the run has data for; the loss plot always."""
    plots = [("Loss (train and validation)", plot_loss(metrics, overfit))]
    plots += [
        ("Tokens per second", plot_throughput(metrics)),
        ("Peak memory", plot_memory(metrics)),
        ("Learning rate", plot_learning_rate(metrics)),
        ("Preference tuning: reward margin and accuracy", plot_preference(metrics)),
        ("GRPO: rewards and KL", plot_rewards(metrics)),
    ]
    return [{"title": t, "src": src, "alt": t} for t, src in plots if src]


# ---------------------------------------------------------------- page content


_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


def inline_diff(reference: str, output: str) -> Markup:
    """The output against the reference, word by word: missing words struck, extra words marked."""
    ref, out = _TOKEN.findall(reference or ""), _TOKEN.findall(output or "")
    parts = []
    sm = difflib.SequenceMatcher(None, ref, out, autojunk=False)
    for op, a0, a1, b0, b1 in sm.get_opcodes():
        if op == "equal":
            parts.append(escape("".join(out[b0:b1])))
            continue
        if a1 > a0:
            parts.append(Markup("<del>%s</del>") % "".join(ref[a0:a1]))
        if b1 > b0:
            parts.append(Markup("<ins>%s</ins>") % "".join(out[b0:b1]))
    return Markup("").join(parts)


def run_card(cfg: dict, run_root: Path) -> list[tuple[str, str]]:
    """(label, value) rows: what a reader needs to reproduce or trust the run."""
    recipe = cfg.get("recipe") or {}
    train = recipe.get("train") or {}
    data = cfg.get("data") or {}
    base = cfg.get("base_model") or {}
    machine = cfg.get("machine") or {}
    versions = cfg.get("versions") or {}
    template_hash = cfg.get("chat_template_sha256")
    if not template_hash and cfg.get("chat_template"):
        template_hash = hashlib.sha256(cfg["chat_template"].encode()).hexdigest()
    lora = recipe.get("lora") or {}
    rows = [
        ("run folder", str(run_root)),
        ("recipe", recipe.get("name", "?")),
        ("method", f"{train.get('method', 'sft')}, {recipe.get('fine_tune_type', '?')}"
                   + (f", rank {lora.get('rank')}, alpha {lora.get('alpha')}, {lora.get('num_layers')} layers"
                      if lora and recipe.get("fine_tune_type") in ("lora", "dora") else "")),
        ("base model", f"{base.get('source', '?')} [{base.get('precision', '?')}]"),
        ("parameters", f"{_count(cfg.get('trainable_parameters'))} trainable of {_count(cfg.get('total_parameters'))}"),
        ("seed", fmt_num(train.get("seed"))),
        ("steps", f"{cfg.get('steps', '?')} (batch {train.get('batch_size', '?')} x {train.get('grad_accumulation', 1)}, "
                  f"lr {train.get('learning_rate', '?')} {train.get('lr_schedule', '')})"),
        ("data", f"{data.get('path', '?')} ({', '.join(f'{k} {v} rows' for k, v in (data.get('rows') or {}).items())})"),
    ]
    rows += [(f"data sha256 ({split})", digest) for split, digest in (data.get("sha256") or {}).items()]
    rows += [
        ("chat template sha256", template_hash or "-"),
        ("default chat template", "yes (the base model had none)" if cfg.get("default_chat_template") else "no"),
        ("system prompt", cfg.get("system_prompt") or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"),
        ("report made by", f"mlxft {mlxft.__version__}"),
        ("machine", ", ".join(f"{k}: {v}" for k, v in machine.items()) or "-"),
        ("started", cfg.get("started") or "-"),
        ("finished", cfg.get("finished") or "not finished"),
    ]
    if isinstance(cfg.get("preference"), dict):  # DPO / ORPO runs (mlxft/training/preference.py)
        pref = cfg["preference"]
        rows.append(("preference", ", ".join(f"{k} {v}" for k, v in pref.items() if not isinstance(v, dict))))
    if cfg.get("resumed"):
        rows.append(("resumed", "; ".join(f"from step {r.get('from_step')} at {r.get('at')}" for r in cfg["resumed"])))
    return rows


def _count(n) -> str:
    """135,000,000 (135.0M): exact for tiny models, readable for big ones."""
    return f"{n:,} ({n / 1e6:.1f}M)" if isinstance(n, int) else "?"


def eval_tables(ev: dict | None) -> list[dict]:
    """Per suite: the columns (every key of every scorer's "values": base, extra setups, adapter) and a row per scorer."""
    if not ev:
        return []
    suites = []
    for name, suite in (ev.get("suites") or {}).items():
        scorers = suite.get("scorers") or []
        extras = []  # e.g. "base 0-shot", "base 3-shot" from `mlxft baseline`: between base and adapter
        for s in scorers:
            extras += [k for k in (s.get("values") or {}) if k not in ("base", "adapter", *extras)]
        columns = ["base", *extras, "adapter"]
        rows = []
        for s in scorers:
            unit = s.get("unit", "score")
            values = s.get("values") or {}
            delta = s.get("delta")
            better = None
            if isinstance(delta, (int, float)) and delta:
                better = (delta > 0) == bool(s.get("higher_is_better", True))
            gate = s.get("gate")
            rows.append({
                "name": s.get("name", "?"),
                "unit": unit,
                "higher_is_better": s.get("higher_is_better", True),
                "cells": [fmt_score(values.get(c), unit) if c in values else "-" for c in columns],
                "delta": fmt_delta(delta, unit),
                "better": better,
                "gate_rule": gate.get("rule", "") if gate else "",
                "gate": None if not gate else bool(gate.get("passed")),
                "confusion": _confusion(s.get("details") or {}),
            })
        failures = [
            {**{k: _visible(str(f.get(k, ""))) for k in ("prompt", "reference", "base", "adapter", "scorer")},
             "adapter_diff": inline_diff(str(f.get("reference", "")), str(f.get("adapter", "")))}
            for f in (suite.get("failures") or []) if isinstance(f, dict)
        ]
        suites.append({
            "name": name, "description": suite.get("description", ""), "data": suite.get("data"), "n": suite.get("n"),
            "seconds": suite.get("seconds") or {}, "columns": columns, "rows": rows, "failures": failures,
            "passed": suite.get("passed") if isinstance(suite.get("passed"), bool) else None,
            "prompt": ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (suite.get("prompt") or {}).items()
                                if not isinstance(v, (dict, list))),
            "baseline": (suite.get("baseline") or {}).get("verdict"),  # "few-shot already meets the gates" or not
        })
    return suites


def _visible(text: str) -> str:
    """Whitespace-only model output shown as a quoted string ("\n\n"), not as an empty-looking cell."""
    return json.dumps(text) if text and not text.strip() else text


def _confusion(details: dict) -> list[dict]:
    """Confusion matrices from a label scorer's details, one per model, as header + rows.

    details.confusion = {"labels": rows, "columns": predicted classes (may add "(other)"), "base": [[..]], ...}
    """
    c = details.get("confusion")
    if not isinstance(c, dict) or not c.get("labels"):
        return []
    labels = c["labels"]
    columns = c.get("columns") or labels
    out = []
    for model, matrix in c.items():
        if model in ("labels", "columns"):
            continue
        if isinstance(matrix, list) and len(matrix) == len(labels) and all(
                isinstance(row, list) and len(row) == len(columns) for row in matrix):
            out.append({"model": model, "labels": columns, "rows": list(zip(labels, matrix))})
    return out


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("mlxft", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(run_path: str | Path) -> str:
    """The report page of the run at `run_path` as HTML text."""
    run = open_run(run_path)
    summary = summarize(run.root, require_metrics=True)
    cfg = read_config(run)
    metrics = read_metrics(run)
    ev = read_eval(run)
    overfit = overfitting_spans(metrics)
    logged_overfit = [e for e in metrics.events if e.get("event") == "overfitting"]
    return _environment().get_template(TEMPLATE).render(
        summary=summary,
        status_hint=status_hint(summary.status, run.root),
        card=run_card(cfg, run.root),
        config_rows=[(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(cfg.get("recipe")).items()],
        plots=make_plots(metrics, overfit),
        overfit=overfit,
        logged_overfit=logged_overfit,
        events=metrics.events,
        eval_passed=ev.get("passed") if ev else None,
        suites=eval_tables(ev),
        fmt_num=fmt_num,
    )


def write_report(run_path: str | Path) -> Path:
    """Write RUN/report.html atomically and return its path."""
    html = render_report(run_path)
    out = Path(run_path) / "report.html"
    try:
        write_atomic(out, html)
        out.chmod(0o644)  # mkstemp makes it owner-only; a report is for sharing
    except OSError as e:
        raise MlxftError(f"cannot write {out}: {e.strerror}") from None
    return out
