"""Fuzz targets for what a user hands mlxft: data files (every format), synth seeds, recipe YAML and
`--set` values, eval suite YAML, and the adapter_config.json / config.json of run folders.

Each target is an entry point: a hypothesis strategy for its input, hand-written hostile cases,
and `run(case)` -> Outcome (see fuzz_harness). The servers' and GGUF's are in fuzz_targets_io.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import yaml
from hypothesis import strategies as st

from fuzz_harness import TEXT_NOISE, Outcome, json_values, mutate, probe, workdir
from mlxft import config as config_mod
from mlxft.evaluation.scorers import SCORERS

BAD = Path(__file__).parent / "fixtures" / "bad"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
EVALS = Path(__file__).resolve().parent.parent / "evals"
ROLES = ["system", "user", "assistant", "tool", "User", "human", "gpt", "", None, 3]
ROW_KEYS = ["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text", "chosen",
            "rejected", "system", "tools", "role", "content", "from", "value", "tool_calls", "name", "id", "type"]
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@dataclass
class Target:
    entry: str  # its row in the counts table
    strategy: object  # hypothesis strategy of cases
    hand: list[tuple[str, object]]  # hand-written hostile cases: (label, case)
    run: Callable[[object], Outcome]  # one case, in a fresh folder


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    """Write {name: bytes}; return the one file, or the folder when there are several."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root / next(iter(files)) if len(files) == 1 else root


@lru_cache(maxsize=1)
def tiny_tokenizer():
    """The test suite's tiny BPE tokenizer with ChatML (no model weights needed)."""
    import tempfile

    from mlx_lm.utils import load_tokenizer

    from conftest import write_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="mlxft-fuzz-tok-"))
    write_tokenizer(folder)
    (folder / "config.json").write_text("{}")
    return load_tokenizer(folder)


# ---------------------------------------------------------------- data files (check, prepare, train)

messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": json_values(max_leaves=3)},
                                          optional={"tool_calls": json_values(("name", "arguments", "function"))}),
                    max_size=5)
chat_row = st.fixed_dictionaries({"messages": st.tuples(TEXT_NOISE, TEXT_NOISE).map(
    lambda qa: [{"role": "user", "content": qa[0]}, {"role": "assistant", "content": qa[1]}])})
rows = st.one_of(
    chat_row,  # a plausible row: most files mix good rows with bad ones
    json_values(ROW_KEYS),
    st.fixed_dictionaries({"messages": messages}, optional={"tools": json_values(), "rejected": json_values()}),
    st.fixed_dictionaries({"conversations": st.lists(st.fixed_dictionaries(
        {"from": st.sampled_from(ROLES), "value": json_values(max_leaves=2)}), max_size=4)}),
    st.fixed_dictionaries({"instruction": json_values(max_leaves=2), "output": json_values(max_leaves=2)},
                          optional={"input": json_values(max_leaves=2), "system": json_values(max_leaves=2)}),
    st.fixed_dictionaries({"prompt": json_values(max_leaves=3), "completion": json_values(max_leaves=2)}),
    st.fixed_dictionaries({"chosen": json_values(max_leaves=3), "rejected": json_values(max_leaves=3)},
                          optional={"prompt": json_values(max_leaves=3)}),
    st.fixed_dictionaries({"text": json_values(max_leaves=2)}),
)


def _jsonl(items) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items).encode("utf-8", "surrogatepass")


def _csv(header, table) -> bytes:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(table)
    return out.getvalue().encode("utf-8", "surrogatepass")


csv_files = st.lists(st.sampled_from(ROW_KEYS) | st.text(max_size=6), min_size=1, max_size=4).flatmap(
    lambda header: st.lists(st.lists(TEXT_NOISE | st.sampled_from(['[{"role": "user"}]', "[]", "{"]),
                                     min_size=len(header), max_size=len(header) + 1), max_size=4)
    .map(lambda table: _csv(header, table)))
data_bytes = st.one_of(
    st.lists(chat_row, min_size=1, max_size=5).map(_jsonl),
    st.lists(rows, max_size=5).map(_jsonl),
    st.lists(rows, max_size=5).map(lambda r: json.dumps(r).encode()),
    st.lists(rows, min_size=1, max_size=4).map(_jsonl).flatmap(mutate),
    csv_files,
    st.binary(max_size=200),
    TEXT_NOISE.map(lambda t: t.encode("utf-8", "surrogatepass")),
)
data_cases = st.one_of(
    st.tuples(st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".ndjson"]), data_bytes)
    .map(lambda c: {"data" + c[0]: c[1]}),
    st.tuples(data_bytes, data_bytes).map(lambda c: {"train.jsonl": c[0], "valid.jsonl": c[1]}),
)


def _bad_corpus() -> list[tuple[str, dict]]:
    cases = []
    for p in sorted(BAD.iterdir()):
        if p.is_file() and p.suffix in (".jsonl", ".json", ".csv", ".tsv"):
            cases.append((p.name, {p.name: p.read_bytes()}))
        elif p.is_dir():
            cases.append((p.name, {f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.is_file()}))
    return cases


def run_data(files: dict[str, bytes]) -> Outcome:
    from mlxft.data.encode import load_splits
    from mlxft.data.check import check_path
    from mlxft.data.prepare import prepare_dataset

    with workdir() as tmp:
        src = write_files(tmp / "in", files)
        splits = write_files(tmp / "splits", {**({"valid.jsonl": _jsonl([GOOD_ROW])} if len(files) == 1 else {}),
                                              **({"train" + src.suffix: files[src.name]} if len(files) == 1 else files)})

        def call():
            report = check_path(src, tokenizer=tiny_tokenizer())
            assert report.ok or "OK to train" not in report.format()  # a check that fails never says OK
            assert not report.ok or any(report.dataset.splits.values())  # never OK on 0 rows
            report.format(0)
            try:
                prepare_dataset(src, tmp / "out", tokenizer=tiny_tokenizer(), log=lambda *_: None)
            finally:
                left = [p.name for p in tmp.iterdir() if p.name.startswith(".")]
                assert not left, f"prepare left {left}"  # no half-written temporary folder
            load_splits(splits)

        return probe(call, [tmp / "in", tmp / "splits"])


DATA = Target("data files: check / prepare / train", data_cases, _bad_corpus(), run_data)


# ---------------------------------------------------------------- synth seeds


def run_seeds(case: tuple[str, bytes]) -> Outcome:
    from mlxft.data.synth import read_seeds

    suffix, data = case
    with workdir() as tmp:
        path = write_files(tmp / "in", {"seeds" + suffix: data})
        return probe(lambda: read_seeds(path), [path])


SEEDS = Target("synth seeds", st.tuples(st.sampled_from([".txt", ".jsonl", ".json", ".csv", ".tsv", ""]), data_bytes),
               [(n, (Path(n).suffix, f[n])) for n, f in _bad_corpus() if len(f) == 1]
               + [("blank lines", (".txt", b"\n \n\t\n")), ("latin-1 topics", (".txt", "caf\u00e9".encode("latin-1")))],
               run_seeds)


# ---------------------------------------------------------------- recipe YAML and --set


def _dotted_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(config_mod.Recipe):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(default)]
        else:
            keys.append(f.name)
    return keys


KEYS = _dotted_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})


def _nested(dotted_values: dict) -> dict:
    out: dict = {}
    for key, value in dotted_values.items():
        head, _, leaf = key.partition(".")
        if leaf:
            section = out.setdefault(head, {})
            if isinstance(section, dict):
                section[leaf] = value
        else:
            out[head] = value
    return out


yaml_values = json_values(max_leaves=4) | st.sampled_from(["1e-4", "yes", "~", "8GB", "-1", "1_000", "0x10", "!!str 3"])
recipe_docs = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=8).map(_nested).map(lambda d: yaml.safe_dump(d)),
    st.dictionaries(st.sampled_from(SECTIONS) | st.text(max_size=8), json_values(KEYS), max_size=5)
    .map(lambda d: yaml.safe_dump(d)),
    st.sampled_from(sorted(RECIPES.glob("*.yaml"))).flatmap(lambda p: mutate(p.read_bytes()))
    .map(lambda b: b.decode("utf-8", "replace")),
    TEXT_NOISE,
    # deep nesting is a hand-written case: PyYAML takes ~3 s to reach its recursion limit
    st.sampled_from(["tiers: {8: {batch_size: [1]}, x: 2}", "&a [*a]", "!!python/object:os.system {}",
                     "train: {iters: 1e400}", "a: " + "[" * 50]),
)
overrides = st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS) | st.text(max_size=10), yaml_values.map(str) | TEXT_NOISE)
    .map(lambda kv: f"{kv[0]}={kv[1]}"),
    TEXT_NOISE), max_size=4)
# tier None detects the machine's memory (0.5 s here): a hand-written case covers it, fuzzing uses given tiers
recipe_cases = st.tuples(recipe_docs, st.sampled_from([8, 16, 0, -8, 7, 10**12]), overrides)


def run_recipe(case) -> Outcome:
    from mlxft.recipes import load_recipe

    text, tier, sets = case
    with workdir() as tmp:
        path = tmp / "fuzz.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return probe(lambda: json.dumps(load_recipe(path, tier=tier, overrides=sets).to_dict(), default=str),
                     [path])


RECIPE = Target("recipe YAML + --set", recipe_cases, [
    ("unknown key, detected tier", ("trian: {iters: 3}\n", None, [])),
    ("wrong type", ("train: {iters: many}\n", 8, [])),
    ("list for a section", ("lora: [1, 2]\n", 8, [])),
    ("tab indent", ("train:\n\titers: 3\n", 8, [])),
    ("billion laughs", ("a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nd: [*c, *c, *c]\n", 8, [])),
    ("python tag", ("!!python/object/apply:os.system [echo hi]\n", 8, [])),
    ("set without =", ("{}\n", 8, ["train.iters"])),
    ("set unknown key", ("{}\n", 8, ["train.itres=3"])),
    ("set bad YAML", ("{}\n", 8, ["train.iters=[1,"])),
    ("set nested into a value", ("{}\n", 8, ["train.iters.x=1"])),
    ("set huge number", ("{}\n", 8, ["train.iters=1e999"])),
    ("set negative batch", ("{}\n", 8, ["train.batch_size=-4"])),
    ("set NaN learning rate", ("{}\n", 8, ["train.learning_rate=.nan"])),
    ("tier not a tier", ("{}\n", 7, [])),
    ("deep nesting", ("a: " + "[" * 10000 + "\n", 8, [])),
    ("deep nesting in --set", ("{}\n", 8, ["train.iters=" + "[" * 3000])),
], run_recipe)


# ---------------------------------------------------------------- eval suite YAML

SUITE_KEYS = ["name", "description", "data", "limit", "prompt", "generation", "scorers", "system", "few_shot",
              "shots", "seed", "max_tokens", "batch_size", "type", "gate", "labels", "pattern", "schema", "field",
              "min", "max", "min_delta", "max_drop_points", "max_rise_pct", "words", "template"]
scorer_specs = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(SCORERS)) | st.text(max_size=8)},
    optional={"name": st.text(max_size=8) | json_values(max_leaves=2), "gate": json_values(SUITE_KEYS, 3),
              "labels": json_values(max_leaves=4), "pattern": st.sampled_from(["(", "a+", "[", "x"]) | st.text(max_size=8),
              "schema": json_values(["type", "properties", "required", "$ref"], 6), "data": json_values(max_leaves=1)})
suite_docs = st.one_of(
    st.fixed_dictionaries({"data": st.just("good.jsonl"), "scorers": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(sorted(SCORERS))}, optional={"name": st.text(max_size=6), "gate": json_values(
            ["min", "max", "min_delta", "max_drop_points", "max_rise_pct"], 2)}), min_size=1, max_size=2)},
                          optional={"limit": st.integers(-1, 3), "generation": st.fixed_dictionaries(
                              {}, optional={"max_tokens": st.integers(-1, 9), "batch_size": st.integers(0, 4)})})
    .map(lambda d: yaml.safe_dump(d)),  # near a valid suite
    st.fixed_dictionaries({}, optional={
        "data": st.sampled_from(["good.jsonl", "fuzz.jsonl", "missing.jsonl", "/etc/passwd", ".."]) | json_values(max_leaves=2),
        "limit": json_values(max_leaves=1),
        "prompt": json_values(["system", "few_shot", "data", "shots", "seed", "good.jsonl"], 6),
        "generation": json_values(["max_tokens", "batch_size"], 4),
        "scorers": st.lists(scorer_specs, max_size=3) | json_values(max_leaves=3),
    }).map(lambda d: yaml.safe_dump(d)),
    st.sampled_from(sorted(EVALS.glob("*.yaml"))).flatmap(lambda p: mutate(p.read_bytes()))
    .map(lambda b: b.decode("utf-8", "replace")),
    TEXT_NOISE,
)
suite_cases = st.tuples(suite_docs, data_bytes)


def run_suite(case) -> Outcome:
    from mlxft.evaluation.suites import load_suite, suite_examples

    text, fuzz_data = case
    with workdir() as tmp:
        second = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
        (tmp / "good.jsonl").write_bytes(_jsonl([GOOD_ROW, second]))
        (tmp / "fuzz.jsonl").write_bytes(fuzz_data)
        path = tmp / "suite.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        return probe(lambda: suite_examples(load_suite(str(path)), "system prompt"), [tmp])


SUITE = Target("eval suite YAML", suite_cases, [
    ("empty file", ("", b"")),
    ("a list", ("- 1\n- 2\n", b"")),
    ("no scorers", ("data: good.jsonl\n", b"")),
    ("regex that does not compile", ("data: good.jsonl\nscorers: [{type: regex, pattern: '('}]\n", b"")),
    ("gate on a missing setting", ("data: good.jsonl\nscorers: [{type: exact_match, gate: {min: eval.nope}}]\n", b"")),
    ("data with no rows", ("data: fuzz.jsonl\nscorers: [{type: exact_match}]\n", b"\n\n")),
    ("data not chat", ("data: fuzz.jsonl\nscorers: [{type: exact_match}]\n", b'{"foo": 1}\n')),
    ("data is a folder", ("data: .\nscorers: [{type: exact_match}]\n", b"")),
    ("few-shot more than rows", ("data: good.jsonl\nprompt: {few_shot: {data: good.jsonl, shots: 9}}\n"
                                 "scorers: [{type: exact_match}]\n", b"")),
    ("schema that is not a schema", ("data: good.jsonl\nscorers: [{type: json_schema, schema: {type: 5}}]\n", b"")),
    ("limit zero", ("data: good.jsonl\nlimit: 0\nscorers: [{type: exact_match}]\n", b"")),
], run_suite)
