"""`mlxft eval`: base vs adapter on eval suites, with gates; writes RUN/eval.json.

    mlxft eval runs/smollm2-135m-... [--suite commit-type --suite safety] [--against builtin:...]

Both models answer the same prompts (batched greedy generation through mlx-lm's
BatchGenerator, with the prompts' shared prefix computed once); every scorer of every
suite gives a base and an adapter figure, its gate passes or fails, and the worst
adapter failures are kept with a word diff. `compare_run` is what `train --compare`
and `mlxft eval` call; `format_comparison` prints its result.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlx_lm.tuner.utils import load_adapters

from mlxft.config import EvalConfig
from mlxft.errors import MlxftError
from mlxft.evaluation.baseline import format_eval_baseline, merge_for_run
from mlxft.evaluation.judge import judge_pairs, mlx_judge
from mlxft.evaluation.scorers import ExactMatch, Example, NormalizedMatch, Score, format_delta, format_value, word_diff
from mlxft.evaluation.sides import Prepared, Side, run_side
from mlxft.evaluation.suites import ScorerSpec, Suite, load_suite, suite_examples
from mlxft.files import write_atomic
from mlxft.models.load import load_base, load_run_base
from mlxft.runs.run import Run, is_run

EVAL_VERSION = 2
MAX_FAILURES = 10


# ---------------------------------------------------------------- scoring and gates


def score_suite(p: Prepared, base: Side | None, adapter: Side, eval_config: EvalConfig | None,
                judge_scores: dict[str, Score]) -> dict:
    """The eval.json entry of one suite (see eval-schema: scorers, failures, seconds)."""
    suite, examples = p.suite, p.examples
    entries, failures = [], []
    for spec in suite.scorers:
        scorer = spec.scorer
        details: dict = {}
        per = {}
        if scorer.kind == "perplexity":
            values = {"base": base.perplexity[spec.name] if base else None, "adapter": adapter.perplexity[spec.name]}
            details["data"] = _shown(spec.data or suite.data)
        elif scorer.kind == "preference":
            sides = {"base": base.preference[spec.name] if base else None, "adapter": adapter.preference[spec.name]}
            values = {k: v["accuracy"] if v else None for k, v in sides.items()}
            details = {key: {k: v[key] for k, v in sides.items() if v}
                       for key in ("accuracy_summed", "margin_per_token", "chosen_logp", "rejected_logp")}
        elif scorer.kind == "judge":
            score = judge_scores.get(spec.name)
            if score is None:
                values = {"base": None, "adapter": None}
                details["note"] = "needs a base to compare with"
            else:
                values = {"base": 1.0 - score.value, "adapter": score.value}
                details = {**score.details, "judge": scorer.model, "template": str(scorer.template_path)}
        else:
            values = {}
            for name, side in (("base", base), ("adapter", adapter)):
                if side is None:
                    values[name] = None
                    continue
                score = scorer.score(side.predictions, examples)
                values[name], per[name] = score.value, score.per_example
                for key, value in score.details.items():  # e.g. confusion -> {"labels", "base", "adapter"}
                    details.setdefault(key, {}).update({name: value})
            details = {k: _flatten_details(v) for k, v in details.items()}
            failures += _failures(spec.name, examples, base, adapter, per)
        delta = values["adapter"] - values["base"] if None not in (values["adapter"], values["base"]) else None
        gate = None
        if spec.gate is not None and values["adapter"] is not None:
            gate = spec.gate.check(values["base"], values["adapter"], scorer.unit, eval_config)
        entries.append({"name": spec.name, "type": scorer.type, "higher_is_better": scorer.higher_is_better,
                        "unit": scorer.unit, "values": values, "delta": delta, "gate": gate, "details": details})
    failures.sort(key=lambda f: (-f.pop("_regression"), f.pop("_score")))
    return {
        "description": suite.description,
        "suite_file": _shown(suite.path),
        "data": _shown(suite.data) if suite.data else None,
        "n": len(examples),
        "prompt": {"system": suite.system, "few_shot": suite.few_shot.shots if suite.few_shot else 0,
                   "max_tokens": suite.max_tokens},
        "seconds": {"base": round(base.seconds, 2) if base else None, "adapter": round(adapter.seconds, 2)},
        "scorers": entries,
        "failures": _dedupe(failures)[:MAX_FAILURES],
        "passed": all(e["gate"]["passed"] is not False for e in entries if e["gate"]),
    }


def _shown(path: Path) -> str:
    """A path relative to the working directory when it is inside it (eval.json stays portable)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _flatten_details(value: dict) -> dict:
    """{"base": {"labels": L, "matrix": M}, "adapter": {...}} -> {"labels": L, "base": M, "adapter": M'}."""
    sample = next(iter(value.values()))
    if isinstance(sample, dict) and "matrix" in sample:
        out = {k: v for k, v in sample.items() if k != "matrix"}
        out.update({side: v["matrix"] for side, v in value.items()})
        return out
    return value


def _failures(name: str, examples: list[Example], base: Side | None, adapter: Side, per: dict) -> list[dict]:
    out = []
    for i, (e, score) in enumerate(zip(examples, per.get("adapter") or [])):
        if score >= 1.0:
            continue
        base_score = per["base"][i] if per.get("base") else None
        users = [m["content"] for m in e.messages if m["role"] == "user"]
        ref = e.reference if e.reference is not None else ""
        out.append({
            "prompt": users[-1] if users else "", "reference": e.reference,
            "base": base.predictions[i] if base else None, "adapter": adapter.predictions[i],
            "scorer": name, "diff": word_diff(ref, adapter.predictions[i]) if ref else None,
            "index": i, "_regression": (base_score or 0.0) - score, "_score": score,
        })
    return out


def _dedupe(failures: list[dict]) -> list[dict]:
    seen, out = set(), []
    for f in failures:
        if f["index"] not in seen:
            seen.add(f["index"])
            out.append(f)
    return out


# ---------------------------------------------------------------- the whole comparison


def _split_suite(run: Run, split: str) -> Suite:
    """The fallback when a recipe names no suites: exact match on the run's own split."""
    data = run.data_path / f"{split}.jsonl"
    if not data.is_file():
        raise MlxftError(f"the run's data has no {split} split ({data}); name a suite with --suite")
    return Suite(name=split, path=data, description=f"the run's {split} split", data=data.resolve(),
                 max_tokens=run.recipe.eval.max_tokens,
                 scorers=[ScorerSpec("exact_match", ExactMatch({}, data.parent)),
                          ScorerSpec("normalized_match", NormalizedMatch({}, data.parent))])


def _load_model(source: str):
    """A run's base (with the chat template it trained with, and with `adapters` its adapter), or a model."""
    if is_run(source):
        return load_run_base(Run.open(source))
    return load_base(source, None, training=False)


def compare_run(target: str | Path, suites: list[str] | None = None, against: str | None = None,
                data: str | None = None, split: str = "test", log=print, judge_fn=None) -> dict:
    """Score base and adapter of a run (or a model, or a model against --against) on eval suites.

    Writes RUN/eval.json atomically (merged with suites from an earlier eval of the same
    adapter) and returns the result; result["passed"] is False when any gate failed.
    """

    target = str(target)
    run = Run.open(target) if is_run(target) else None
    eval_config = run.recipe.eval if run else EvalConfig()
    names = [suites] if isinstance(suites, str) else list(suites or eval_config.suites)
    if data is not None and len(names) != 1:
        raise MlxftError("--data replaces one suite's data: name exactly one --suite")
    loaded = [load_suite(n, data) for n in names] if names else [_split_suite(run, split)] if run else None
    if loaded is None:
        raise MlxftError(f"{target} is a model, not a run: name the suites to score with --suite")
    prepared = [Prepared(s, suite_examples(s, run.system_prompt if run else None)) for s in loaded]

    if run:
        adapters = run.adapters
        if not (adapters / "adapters.safetensors").is_file():
            raise MlxftError(f"run {target} has no adapters yet ({adapters}/adapters.safetensors missing)")
    base_side, base_desc = None, None
    base_source = run.base_source if run else target
    if against is not None or run:
        ref = against if against is not None else target
        if against is not None and is_run(ref):  # another run: its base with its adapter
            base = load_run_base(Run.open(ref), with_adapters=True)
        else:
            base = _load_model(ref)
        base_desc = against if against is not None else base_source
        log(f"scoring the base ({base_desc}) on {', '.join(p.suite.name for p in prepared)} ...")
        base_side = run_side(base.model, base.tokenizer, prepared, "base", log)
        model = base if against is None else None
    else:
        model = None
    if model is None:
        model = _load_model(target if run else base_source)
    if run:
        load_adapters(model.model, str(adapters))
        model.model.eval()
    label = "adapter" if run else target
    log(f"scoring {'the adapter' if run else target} on the same prompts ...")
    tuned_side = run_side(model.model, model.tokenizer, prepared, label, log)

    judge_scores = _run_judges(prepared, base_side, tuned_side, base_source, judge_fn, log)
    result = {
        "version": EVAL_VERSION,
        "run": str(run.root) if run else None,
        "base_model": base_desc,
        "adapter": str(adapters) if run else target,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "passed": None,
        "suites": {p.suite.name: score_suite(p, base_side and base_side[p.suite.name], tuned_side[p.suite.name],
                                             eval_config, judge_scores.get(p.suite.name, {}))
                   for p in prepared},
    }
    if run:
        result = _merge_previous(run.folder.eval_json, result)
        merge_for_run(result, run)  # `mlxft baseline` columns: base 0-shot / K-shot beside base, adapter
    result["passed"] = all(s["passed"] for s in result["suites"].values())
    if run:
        write_atomic(run.folder.eval_json, json.dumps(result, indent=2) + "\n")
    return result


def _merge_previous(path: Path, result: dict) -> dict:
    """Keep suites from an earlier eval.json of the same base and adapter that this run did not redo."""
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return result
    if old.get("version") != EVAL_VERSION or old.get("adapter") != result["adapter"] \
            or old.get("base_model") != result["base_model"]:
        return result
    suites = {k: v for k, v in old.get("suites", {}).items() if k not in result["suites"]}
    suites.update(result["suites"])
    return {**old, **result, "suites": suites}


def _run_judges(prepared, base_side, tuned_side, base_source, judge_fn, log) -> dict[str, dict[str, Score]]:
    out: dict[str, dict[str, Score]] = {}
    judges = [(p, s) for p in prepared for s in p.suite.scorers if s.scorer.kind == "judge"]
    if not judges or base_side is None:
        return out
    loaded = {}
    for p, spec in judges:
        fn = judge_fn
        if fn is None:
            source = base_source if spec.scorer.model == "base" else spec.scorer.model
            if source not in loaded:

                log(f"loading the judge model {source} ...")
                judge_model = load_base(source, None, training=False)
                loaded[source] = mlx_judge(judge_model.model, judge_model.tokenizer)
            fn = loaded[source]
        log(f"  judge: {p.suite.name}/{spec.name}: {2 * len(p.examples)} order-swapped judgments ...")
        out.setdefault(p.suite.name, {})[spec.name] = judge_pairs(
            spec.scorer, fn, p.examples, base_side[p.suite.name].predictions, tuned_side[p.suite.name].predictions)
    return out


# ---------------------------------------------------------------- printing


def format_comparison(result: dict, max_failures: int = 3) -> str:
    """Side-by-side table per suite and scorer, confusion of the adapter, worst failures with a diff."""
    lines = []
    for name, suite in result["suites"].items():
        secs = suite["seconds"]
        took = f"base {secs['base']:.0f} s, adapter {secs['adapter']:.0f} s" if secs["base"] is not None \
            else f"{secs['adapter']:.0f} s"
        lines.append(f"{name}: {suite['n']} rows, {suite['description']} ({took})")
        lines.append(f"  {'scorer':<22}{'base':>9}{'adapter':>9}{'delta':>11}  gate")
        for s in suite["scorers"]:
            gate = s["gate"]
            verdict = "" if not gate else f"{'PASS' if gate['passed'] else 'FAIL' if gate['passed'] is False else 'n/a'}  {gate['rule']}"
            arrow = "" if s["higher_is_better"] else " (lower is better)"
            lines.append(f"  {s['name'] + arrow:<22}{format_value(s['values']['base'], s['unit']):>9}"
                         f"{format_value(s['values']['adapter'], s['unit']):>9}"
                         f"{format_delta(s['delta'], s['unit'], s['values']['base']):>11}  {verdict}".rstrip())
            if "wins" in s["details"]:
                d = s["details"]
                lines.append(f"    judge: {d['wins']} wins, {d['ties']} ties, {d['losses']} losses; "
                             f"picked A {100 * d['first_position_rate']:.0f}% of the time, "
                             f"consistent on {100 * d['consistency']:.0f}% of pairs")

        lines += format_eval_baseline(suite)
        for f in suite["failures"][:max_failures]:
            prompt = " ".join(f["prompt"].split())
            lines.append(f"  failure [{f['scorer']}] {prompt[:90]}{'...' if len(prompt) > 90 else ''}")
            lines.append(f"    reference: {_short(f['reference'])}  base: {_short(f['base'])}  adapter: {_short(f['adapter'])}")
            if f.get("diff"):
                lines.append(f"    diff: {_short(f['diff'], 120)}")
    failed = [f"{n}/{s['name']}" for n, suite in result["suites"].items() for s in suite["scorers"]
              if s["gate"] and s["gate"]["passed"] is False]
    lines.append("gates: all passed" if not failed else f"gates FAILED: {', '.join(failed)}")
    return "\n".join(lines)


def _short(text, width: int = 40) -> str:
    if text is None:
        return "-"
    text = " ".join(str(text).split())
    return repr(text if len(text) <= width else text[: width - 3] + "...")
