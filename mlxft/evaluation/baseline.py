"""`mlxft baseline`: how far does prompting the base model get, before any training?

    mlxft baseline smollm2-135m --suite commit-type --shots 3

Scores the recipe's base model on an eval suite zero-shot and with K few-shot examples
drawn (seeded) from the recipe's training split, never from the suite's test data (checked:
not the same file, and no example whose user text is also a test prompt, even up to case
and punctuation). Each prompting setup is held against the suite's gates, with relative
gates measured against the zero-shot base; when one already meets every gate, fine-tuning
is not needed for that suite, and the command says so.

Results go to RUN/baseline.json with `--run RUN` (and straight into RUN/eval.json when it
exists), otherwise to RUNS/baselines/<recipe>.json. `mlxft eval RUN` merges the baseline of
the run's recipe and base model into eval.json as extra "values" columns ("base 0-shot",
"base 3-shot"), so eval tables and the report show base / few-shot base / adapter side by side.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from mlxft.config import EvalConfig
from mlxft.data.check import near_key
from mlxft.errors import DataError, MlxftError
from mlxft.evaluation.scorers import format_value
from mlxft.evaluation.sides import Prepared, run_side
from mlxft.evaluation.suites import FewShot, load_suite, suite_examples
from mlxft.files import write_atomic
from mlxft.models.load import load_base, load_run_base
from mlxft.recipes import load_recipe, resolve_data_dir
from mlxft.runs.run import Run

BASELINE_VERSION = 1


def column(shots: int) -> str:
    """The eval.json "values" key of a prompting setup: "base 0-shot", "base 3-shot"."""
    return f"base {shots}-shot"


# ---------------------------------------------------------------- what is scored


@dataclasses.dataclass
class Target:
    """The base model a baseline scores, with the prompt and training data a run of it would use."""

    recipe: str
    source: str  # model source, as in the recipe
    quantize: int | None
    system_prompt: str | None
    train_data: Path  # where few-shot examples come from
    run: Run | None = None  # when a run's base is scored
    runs_dir: Path | None = None  # where run folders go (default $MLXFT_RUNS or ./runs)
    eval: object = None  # the recipe's EvalConfig: the thresholds gates like eval.max_refusal_drop_points name

    @property
    def baseline_path(self) -> Path:
        """RUN/baseline.json for a run; before any run, RUNS/baselines/<recipe>.json (found by `mlxft eval`)."""
        if self.run:
            return self.run.root / "baseline.json"
        return runs_root(self.runs_dir) / "baselines" / f"{self.recipe}.json"


def runs_root(runs_dir: str | Path | None = None) -> Path:
    return Path(runs_dir or os.environ.get("MLXFT_RUNS") or "runs")


def resolve_target(recipe: str | None, run: str | None = None, model: str | None = None,
                   runs_dir: str | Path | None = None) -> Target:
    """The recipe's base (optionally another --model), or the base of an existing run."""

    if run:
        found = Run.open(run)
        if model and model != found.base_source:
            raise MlxftError(f"--model {model} differs from the base of run {run} ({found.base_source})")
        if found.data_path is None:
            raise MlxftError(f"run {run} records no data path, so there is no training split to draw few-shot "
                             "examples from; give the recipe instead of --run")
        return Target(found.name, found.base_source, found.quantize, found.system_prompt,
                      found.data_path / "train.jsonl", found)

    rec = load_recipe(recipe, overrides=(f"model.source={model}",) if model else ())
    return Target(rec.name, rec.model.source, rec.quantize, rec.data.system_prompt,
                  resolve_data_dir(rec.data.path) / "train.jsonl", runs_dir=Path(runs_dir) if runs_dir else None,
                  eval=rec.eval)


def prompting_setups(suite, train: Path, shots: int, seed: int = 0, system_prompt: str | None = None) -> dict[str, list]:
    """Column -> the suite's examples with that prompt: zero-shot, and K shots from `train` (never test data)."""

    if suite.data is None:
        raise MlxftError(f"suite {suite.name} has no data to prompt with")
    zero = dataclasses.replace(suite, few_shot=None)
    setups = {column(0): zero}
    if shots:
        if not train.is_file():
            raise DataError(f"few-shot examples come from the training split, and {train} does not exist")
        if train.resolve() == Path(suite.data).resolve():
            raise DataError(f"few-shot examples would come from {train}, which is the suite's test data; "
                            "they must come from the training split")
        setups[column(shots)] = dataclasses.replace(suite, few_shot=FewShot(train, shots, seed))
    out = {}
    for name, s in setups.items():
        examples = suite_examples(s, system_prompt)
        _assert_no_test_shots(examples, suite, name)
        out[name] = examples
    return out


def _assert_no_test_shots(examples, suite, name: str) -> None:
    """Every few-shot turn is a training example, never a test prompt (also up to case and punctuation)."""

    def key(text: str) -> str:
        return near_key({"text": text})

    tests = {key(m["content"]) for e in examples for m in e.row.get("messages", []) if m["role"] == "user"}
    for e in examples:
        own = {key(m["content"]) for m in e.row.get("messages", []) if m["role"] == "user"}
        shots = [m["content"] for m in e.messages if m["role"] == "user" and key(m["content"]) not in own]
        leaked = [s for s in shots if key(s) in tests]
        if leaked:
            raise DataError(f"{name}: the few-shot example {leaked[0][:60]!r} is also a prompt of the test data "
                            f"{suite.data}; few-shot examples must come from the training split only")


# ---------------------------------------------------------------- running


def run_baseline(target: Target, suite_name: str, shots: int = 3, seed: int = 0, log=print) -> dict:
    """Score the base model with each prompting setup; write and return the baseline entry of the suite."""

    if shots < 0:
        raise MlxftError(f"--shots must be 0 or more, got {shots}")
    suite = load_suite(suite_name)
    setups = prompting_setups(suite, target.train_data, shots, seed, target.system_prompt)
    model = _load_base(target)
    sides = {}
    for name, examples in setups.items():
        log(f"scoring {target.source} {name} on {suite.name} ({len(examples)} rows) ...")
        sides[name] = run_side(model.model, model.tokenizer, [Prepared(suite, examples)], name, log)[suite.name]
    entry = score_setups(suite, setups, sides, _eval_config(target))
    entry.update({"few_shot_data": str(target.train_data), "seed": seed, "system_prompt": target.system_prompt,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    record(target, suite.name, entry)
    return entry


def _load_base(target: Target):
    if target.run is not None:
        return load_run_base(target.run)  # with the chat template the run trained with
    return load_base(target.source, target.quantize, training=False)


def _eval_config(target: Target):
    if target.run is not None:
        return target.run.recipe.eval
    return target.eval or EvalConfig()


def score_setups(suite, setups: dict[str, list], sides: dict, eval_config) -> dict:
    """Scorer values and gate verdicts per prompting setup; relative gates compare with zero-shot."""
    scorers = []
    zero = column(0)
    for spec in suite.scorers:
        kind = spec.scorer.kind
        if kind not in ("text", "perplexity"):  # a pairwise judge or a chosen-vs-rejected score compares models
            continue
        values = {}
        for name, examples in setups.items():
            side = sides[name]
            values[name] = side.perplexity[spec.name] if kind == "perplexity" else \
                spec.scorer.score(side.predictions, examples).value
        gates = {name: spec.gate.check(values[zero], v, spec.scorer.unit, eval_config) if spec.gate else None
                 for name, v in values.items()}
        scorers.append({"name": spec.name, "type": spec.scorer.type, "unit": spec.scorer.unit,
                        "higher_is_better": spec.scorer.higher_is_better, "values": values, "gates": gates})
    has_gates = any(g for s in scorers for g in s["gates"].values())
    meets = {name: (all(s["gates"][name]["passed"] is True for s in scorers if s["gates"][name]) if has_gates else None)
             for name in setups}
    samples = {name: [{"prompt": e.messages[-1]["content"], "reference": e.reference, "reply": reply}
                      for e, reply in list(zip(examples, sides[name].predictions))[:5]]
               for name, examples in setups.items()}  # what the base actually answers, to read
    return {"suite": suite.name, "suite_file": str(suite.path), "data": str(suite.data), "n": len(setups[zero]),
            "columns": list(setups), "scorers": scorers, "meets_gates": meets,
            "seconds": {name: round(sides[name].seconds, 2) for name in setups}, "samples": samples}


# ---------------------------------------------------------------- recording and merging


def record(target: Target, suite_name: str, entry: dict) -> Path:
    """Merge `entry` into the baseline file (same base model), and into RUN/eval.json when there is one."""
    path = target.baseline_path
    data = read_baseline(path)
    if data is None or data.get("base_model") != target.source:
        data = {"version": BASELINE_VERSION, "recipe": target.recipe, "base_model": target.source, "suites": {}}
    old = data["suites"].get(suite_name)
    data["suites"][suite_name] = _merge_entry(old, entry) if old and old.get("data") == entry["data"] \
        and old.get("n") == entry["n"] else entry
    write_atomic(path, json.dumps(data, indent=2) + "\n")
    eval_json = target.run.folder.eval_json if target.run else None
    if eval_json and eval_json.is_file():
        result = json.loads(eval_json.read_text())
        merge_into_eval(result, data, str(path))
        write_atomic(eval_json, json.dumps(result, indent=2) + "\n")
    return path


def _merge_entry(old: dict, new: dict) -> dict:
    """A later `--shots 5` adds its column beside the 0- and 3-shot ones of an earlier call."""
    merged = {**old, **new, "columns": list(dict.fromkeys([*old["columns"], *new["columns"]]))}
    merged["meets_gates"] = {**old["meets_gates"], **new["meets_gates"]}
    merged["seconds"] = {**old.get("seconds", {}), **new.get("seconds", {})}
    by_name = {s["name"]: s for s in old["scorers"]}
    merged["scorers"] = []
    for s in new["scorers"]:
        before = by_name.get(s["name"], {"values": {}, "gates": {}})
        merged["scorers"].append({**s, "values": {**before["values"], **s["values"]},
                                  "gates": {**before["gates"], **s["gates"]}})
    return merged


def read_baseline(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("version") == BASELINE_VERSION else None


def find_baseline(run: Run, recipe_name: str, base_source: str) -> tuple[dict, str] | None:
    """RUN/baseline.json, else RUNS/baselines/<recipe>.json next to the run, when it is of the same base."""
    for path in (run.root / "baseline.json", run.root.parent / "baselines" / f"{recipe_name}.json"):
        data = read_baseline(path)
        if data is not None and data.get("base_model") == base_source:
            return data, str(path)
    return None


def merge_into_eval(result: dict, baseline: dict, source: str) -> None:
    """Put baseline columns into eval.json's scorer values (order: base, base K-shot..., adapter)
    and a `baseline` entry per suite with the gate verdicts."""
    for name, suite in result.get("suites", {}).items():
        b = baseline.get("suites", {}).get(name)
        if not b or b.get("data") != suite.get("data"):
            continue  # scored on other data: the numbers would not be comparable
        by_name = {s["name"]: s for s in b["scorers"]}
        for s in suite["scorers"]:
            extra = by_name.get(s["name"], {}).get("values", {})
            if extra:
                s["values"] = _ordered({**s["values"], **extra})
        suite["baseline"] = {"columns": b["columns"], "meets_gates": b["meets_gates"], "file": source,
                             "few_shot_data": b.get("few_shot_data"), "verdict": verdict(b)}


def _ordered(values: dict) -> dict:
    """base, base 0-shot, base 3-shot, ..., adapter: prompting setups between the two models they sit between."""
    def rank(key: str):
        if key == "base":
            return (0, 0)
        if key.startswith("base ") and key.endswith("-shot") and key[5:-5].isdigit():
            return (1, int(key[5:-5]))
        return (3, 0) if key == "adapter" else (2, 0)

    return dict(sorted(values.items(), key=lambda kv: rank(kv[0])))


def merge_for_run(result: dict, run: Run) -> None:
    """The `mlxft eval` hook: merge the run's baseline (if any) into its fresh eval result."""
    found = find_baseline(run, run.recipe_dict.get("name", ""), run.base_source)
    if found:
        merge_into_eval(result, *found)


# ---------------------------------------------------------------- printing


def verdict(entry: dict) -> str:
    """One plain sentence: does prompting alone already meet the suite's gates?"""
    meets = entry["meets_gates"]
    if all(v is None for v in meets.values()):
        return f"{entry['suite']} has no gates, so no verdict on whether fine-tuning is needed"
    passing = [c for c in entry["columns"] if meets.get(c)]
    if passing:
        best = passing[0]
        return (f"prompting the base model ({best}) already meets every gate of {entry['suite']}: "
                "fine-tuning is not needed for this suite")
    return f"no prompting setup ({', '.join(entry['columns'])}) meets the gates of {entry['suite']}: fine-tune"


def format_baseline(entry: dict) -> str:
    """A table: scorer x prompting setup, each with its gate verdict; then the verdict sentence."""

    cols = entry["columns"]
    lines = [f"{entry['suite']}: {entry['n']} rows, base model prompting only "
             f"(few-shot examples from {entry.get('few_shot_data', 'the training split')})",
             f"  {'scorer':<22}" + "".join(f"{c:>14}" for c in cols) + "  gate (setup = the column's prompting)"]
    for s in entry["scorers"]:
        marks = []
        for c in cols:
            g = s["gates"].get(c)
            marks.append("" if not g else "PASS" if g["passed"] else "FAIL" if g["passed"] is False else "n/a")
        rule = next((g["rule"] for g in s["gates"].values() if g), "")
        rule = rule.replace("adapter", "setup").replace("base", "0-shot")  # the column's setup vs zero-shot
        lines.append(f"  {s['name']:<22}" + "".join(f"{format_value(s['values'].get(c), s['unit']):>14}" for c in cols)
                     + (f"  {'/'.join(marks)}  {rule}" if rule else ""))
    lines.append(f"  {verdict(entry)}")
    return "\n".join(lines)


def format_eval_baseline(suite: dict) -> list[str]:
    """Lines `mlxft eval` prints under a suite's table when a baseline was merged in."""

    b = suite.get("baseline")
    if not b:
        return []
    lines = [f"  baseline (base model, prompting only, few-shot from the training split; {b['file']}):"]
    for s in suite["scorers"]:
        shown = [f"{c} {format_value(s['values'].get(c), s['unit'])}" for c in b["columns"] if c in s["values"]]
        if shown:
            lines.append(f"    {s['name']:<20}" + "   ".join(shown))
    lines.append(f"  {b['verdict']}")
    return lines

