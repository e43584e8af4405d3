"""`mlxft eval-pairs RUN` (and `train --compare` for a preference run without suites): does the
adapter prefer the chosen style?

Scores base and adapter on held-out preference pairs by mean per-token log-prob and merges the
result into RUN/eval.json as one suite, gated on the adapter beating the base.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.nn as nn
from mlx_lm.tuner.utils import load_adapters

from mlxft.data.pairs import encode_pairs, read_pair_rows, split_pair
from mlxft.errors import DataError, MlxftError
from mlxft.files import write_atomic
from mlxft.models.load import load_run_base
from mlxft.runs.run import Run
from mlxft.training.preference import pair_logps


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


def compare_pairs(run_path: str | Path, data: str | Path | None = None, log=print) -> dict:
    """Score the run's base and adapter on held-out pairs; merge the suite into RUN/eval.json.

    `data` defaults to the run's test split. The suite entry follows eval.json's schema
    (version 2): one `preference_accuracy` scorer, gated on the adapter beating the base.
    """
    run = Run.open(run_path)
    recipe = run.recipe
    path = Path(data) if data else run.data_path / "test.jsonl"
    rows = read_pair_rows(path)
    adapters = run.adapters
    if not (adapters / "adapters.safetensors").is_file():
        raise MlxftError(f"run {run.root} has no adapters yet ({adapters}/adapters.safetensors missing)")
    base = load_run_base(run)
    system, family = run.system_prompt, recipe.model.family
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
    return _merge_eval_json(run, suite)


def _prompt_text(row: dict) -> str:
    prompt, _, _ = split_pair(row)
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _merge_eval_json(run: Run, suite: dict) -> dict:
    """Add (or replace) this suite in RUN/eval.json, keeping the other suites an eval wrote."""
    try:
        result = json.loads(run.folder.eval_json.read_text())
        if not isinstance(result.get("suites"), dict):
            raise ValueError
    except (OSError, ValueError):
        result = {"version": 2, "run": str(run.root), "base_model": run.base_source,
                  "adapter": str(run.adapters), "suites": {}}
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["suites"][PAIRS_SUITE] = suite
    result["passed"] = all(s.get("passed", True) is not False for s in result["suites"].values())
    write_atomic(run.folder.eval_json, json.dumps(result, indent=2) + "\n")
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
