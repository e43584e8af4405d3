"""`mlxft runs compare A B`: two runs side by side (config differences, key figures, eval scores).

    mlxft runs compare runs/smollm2-135m-20261123-120000 runs/smollm2-135m-20261123-140000
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.runs.summary import (
    columns, flatten, fmt_delta, fmt_num, fmt_score, open_run, read_config, read_eval, summarize,
)


def config_differences(a: dict, b: dict) -> list[tuple[str, object, object]]:
    """Keys of the resolved recipe, data, base model and versions whose values differ."""
    def view(cfg):
        return flatten({
            "recipe": cfg.get("recipe"), "data.sha256": (cfg.get("data") or {}).get("sha256"),
            "data.path": (cfg.get("data") or {}).get("path"), "base_model": cfg.get("base_model"),
            "versions": cfg.get("versions"), "chat_template_sha256": cfg.get("chat_template_sha256"),
            "system_prompt": cfg.get("system_prompt"),
        })
    fa, fb = view(a), view(b)
    missing = object()
    diffs = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            diffs.append((key, None if va is missing else va, None if vb is missing else vb))
    return diffs


def compare_runs(path_a: str | Path, path_b: str | Path) -> str:
    """`mlxft runs compare A B`: config differences, key figures and eval scores side by side."""
    a, b = summarize(path_a, require_metrics=True), summarize(path_b, require_metrics=True)
    ra, rb = open_run(path_a), open_run(path_b)
    lines = [f"A: {a.path}", f"B: {b.path}", "", "config differences:"]
    diffs = config_differences(read_config(ra), read_config(rb))
    if diffs:
        lines += [columns([["key", "A", "B"]] + [[k, _short(va), _short(vb)] for k, va, vb in diffs])]
    else:
        lines += ["  none (same recipe, data, base model and versions)"]
    figures = [
        ["", "A", "B"],
        ["status", a.status, b.status],
        ["steps", f"{a.steps_done}/{a.steps_total}", f"{b.steps_done}/{b.steps_total}"],
        ["final train loss", fmt_num(a.train_loss), fmt_num(b.train_loss)],
        ["final val loss", fmt_num(a.val_loss), fmt_num(b.val_loss)],
        ["best val loss", f"{fmt_num(a.best_val_loss)} @ {a.best_step}", f"{fmt_num(b.best_val_loss)} @ {b.best_step}"],
        ["tokens/s", fmt_num(a.tokens_per_sec, 1), fmt_num(b.tokens_per_sec, 1)],
        ["supervised tokens/s", fmt_num(a.supervised_tokens_per_sec, 2), fmt_num(b.supervised_tokens_per_sec, 2)],
        ["peak memory GB", fmt_num(a.peak_memory_gb, 2), fmt_num(b.peak_memory_gb, 2)],
        ["overfitting", "yes" if a.overfitting else "no", "yes" if b.overfitting else "no"],
    ]
    lines += ["", "metrics:", columns(figures), "", "eval (adapter scores; base in brackets):"]
    lines += [_eval_side_by_side(read_eval(ra), read_eval(rb))]
    return "\n".join(lines)


def eval_deltas(ea: dict | None, eb: dict | None) -> list[dict]:
    """Every (suite, scorer) of either run's eval.json: A's and B's scorer entries (None where a run lacks
    it), the unit, and B's adapter score minus A's (None unless both have one)."""
    def scores(ev):
        out = {}
        for suite, body in ((ev or {}).get("suites") or {}).items():
            for s in body.get("scorers") or []:
                out[(suite, s["name"])] = s
        return out

    sa, sb = scores(ea), scores(eb)
    rows = []
    for key in list(sa) + [k for k in sb if k not in sa]:
        x, y = sa.get(key), sb.get(key)
        delta = None
        if x and y and x["values"].get("adapter") is not None and y["values"].get("adapter") is not None:
            delta = y["values"]["adapter"] - x["values"]["adapter"]
        rows.append({"suite": key[0], "scorer": key[1], "unit": (x or y).get("unit"), "a": x, "b": y, "delta": delta})
    return rows


def _eval_side_by_side(ea: dict | None, eb: dict | None) -> str:
    if not ea and not eb:
        return "  neither run has eval.json (run: mlxft eval RUN)"
    rows = [["suite", "scorer", "A", "B", "B - A"]]
    for d in eval_deltas(ea, eb):
        rows.append([d["suite"], d["scorer"], score_cell(d["a"], d["unit"]), score_cell(d["b"], d["unit"]),
                     fmt_delta(d["delta"], d["unit"])])
    return columns(rows)


def score_cell(s: dict | None, unit: str | None) -> str:
    """One run's scorer entry as "adapter [base] pass|FAIL"."""
    if not s:
        return "-"
    gate = "" if not s.get("gate") else (" pass" if s["gate"].get("passed") else " FAIL")
    return f"{fmt_score(s['values'].get('adapter'), unit)} [{fmt_score(s['values'].get('base'), unit)}]{gate}"


def _short(v, width: int = 60) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."
