"""Formats in: detection, normalising, prepare's deterministic split and manifest."""

import csv
import hashlib
import json
import random

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.data.encode import load_splits
from mlxft.data.formats import load_dataset
from mlxft.data.prepare import assign_split, prepare_dataset

CHAT = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
ROWS = {
    "chat": {"messages": CHAT},
    "sharegpt": {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    "alpaca": {"instruction": "q", "input": "", "output": "a"},
    "completions": {"prompt": "q", "completion": "a"},
    "text": {"text": "just text"},
    "preference": {"prompt": "q", "chosen": "a", "rejected": "b"},
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_each_format_is_detected_and_normalised(fmt, tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps(ROWS[fmt]) + "\n")
    ds = load_dataset(tmp_path / "data.jsonl")
    assert list(ds.formats.values()) == [fmt] and not ds.problems
    row = ds.splits["data"][0].row
    assert row == ({"text": "just text"} if fmt == "text" else
                   {"messages": CHAT, **({"rejected": [{"role": "assistant", "content": "b"}]} if fmt == "preference" else {})})


def test_sharegpt_system_alpaca_input_and_content_parts(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"instruction": "Add", "input": "1 2", "output": "3", "system": "S"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "he"}, {"type": "text", "text": "llo"}]},
        {"role": "assistant", "content": "hi"}]}) + "\n")
    ds = load_dataset(tmp_path)
    first, second = (e.row["messages"] for e in ds.splits["data"])
    assert first == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add\n\n1 2"},
                     {"role": "assistant", "content": "3"}]
    assert second[0]["content"] == "hello"


def test_json_array_csv_and_tsv(tmp_path):
    (tmp_path / "train.json").write_text(json.dumps([ROWS["alpaca"]] * 2))
    with open(tmp_path / "valid.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion"])
        w.writerow(["multi\nline, quoted", "a"])
    (tmp_path / "test.tsv").write_text("instruction\toutput\nq\ta\n")
    ds = load_dataset(tmp_path)
    assert not ds.problems
    assert ds.formats == {str(tmp_path / "test.tsv"): "alpaca", str(tmp_path / "train.json"): "alpaca",
                          str(tmp_path / "valid.csv"): "completions"}
    assert ds.splits["valid"][0].row["messages"][0]["content"] == "multi\nline, quoted"
    assert ds.splits["train"][1].where.endswith("train.json[1]")


def test_format_override_and_bom_tolerated(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS["completions"]).encode() + b"\r\n")
    ds = load_dataset(p, fmt="completions")
    assert [q.severity for q in ds.problems] == ["warning"] and "BOM" in ds.problems[0].message
    ds = load_dataset(p, fmt="alpaca")
    assert any("missing key(s) instruction, output" in q.message for q in ds.problems)
    assert ds.problems[-1].code == "no-rows"  # and the file as a whole is refused: nothing usable in it


def _corpus(n=200):
    rng = random.Random(1)
    return [{"instruction": f"task {i} {rng.random():.6f}", "output": f"answer {i}"} for i in range(n)]


def test_split_is_stable_under_reordering_and_seeded(tmp_path, tiny_model):
    rows = _corpus()
    for name, order in (("a", rows), ("b", list(reversed(rows)))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in order))
        r = run("data", "prepare", tmp_path / f"{name}.jsonl", tmp_path / f"out-{name}", "--model", tiny_model)
        assert r.exit_code == 0, r.output

    def split_of(out):
        return {line: s for s in ("train", "valid", "test") for line in (out / f"{s}.jsonl").read_text().splitlines()}

    assert split_of(tmp_path / "out-a") == split_of(tmp_path / "out-b")
    chat = {"messages": CHAT}
    assert {assign_split(chat, seed) for seed in range(50)} == {"train", "valid", "test"}
    counts = [sum(assign_split({"text": str(i)}, 0) == "train" for i in range(2000))]
    assert 0.87 < counts[0] / 2000 < 0.93


def test_manifest_and_refusal_to_overwrite(tmp_path, tiny_model):
    from mlxft.data.encode import load_tokenizer
    from mlxft.recipes import load_recipe

    src = tmp_path / "src.jsonl"
    rows = _corpus(100)
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:5]))  # 5 exact duplicates
    recipe = load_recipe("smollm2-135m", overrides=[f"model.source={tiny_model}"])
    out = tmp_path / "out"
    m = prepare_dataset(src, out, (0.8, 0.1, 0.1), 3, None, load_tokenizer(str(tiny_model))[0], recipe,
                        log=lambda s: None).manifest
    assert m["dropped_exact_duplicates"] == 5 and m["formats"] == {"src.jsonl": "alpaca"} and m["seed"] == 3
    assert sum(s["rows"] for s in m["splits"].values()) == 100
    for split, entry in m["splits"].items():
        assert entry["sha256"] == hashlib.sha256((out / f"{split}.jsonl").read_bytes()).hexdigest()
        assert entry["tokens"]["supervised"] > 0 and entry["tokens"]["truncated"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.jsonl"]  # no temp folder left
    r = run("data", "prepare", src, out, "--model", tiny_model)
    assert r.exit_code == 1 and "not empty" in r.output


def test_unseen_format_prepared_checked_and_trained(tmp_path, tiny_model):
    """A ShareGPT JSON array with tool-free multi-turn rows goes through prepare -> check -> train."""
    rng = random.Random(0)
    rows = [{"conversations": [{"from": "human", "value": f"{w} {rng.random():.5f}"}, {"from": "gpt", "value": w},
                               {"from": "human", "value": "again"}, {"from": "gpt", "value": w}]}
            for w in rng.choices(["alpha", "beta", "gamma"], k=120)]
    (tmp_path / "dump.json").write_text(json.dumps(rows))
    out = tmp_path / "prepared"
    assert run("data", "prepare", tmp_path / "dump.json", out, "--model", tiny_model).exit_code == 0
    check = run("data", "check", out, "--model", tiny_model)
    assert check.exit_code == 0, check.output
    assert load_splits(out)["train"][0]["messages"][1]["role"] == "assistant"
    r = run("train", "smollm2-135m", "--data", out, "--runs-dir", tmp_path / "runs", "--model", tiny_model,
            "--set", "train.iters=2", "--set", "train.batch_size=2", "--set", "lora.num_layers=1",
            "--set", "train.val_every=2", "--set", "train.val_batches=1")
    assert r.exit_code == 0, r.output


def test_prompt_rows_for_grpo_are_read_and_checked(tmp_path, tiny_model):
    """GRPO learns from prompts: {"prompt", "reference"} rows and chat rows ending with a user turn are
    data for a grpo recipe (prepare keeps them, data check passes them), an error for an SFT one."""
    src = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"question {i}", "reference": f"answer {i}", "system": "Be brief."} for i in range(20)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = load_dataset(src)
    assert ds.formats[str(src)] == "prompts" and not ds.problems
    first = ds.splits["data"][0].row
    assert first == {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "question 0"}],
                     "reference": "answer 0"}
    grpo = tmp_path / "grpo.yaml"
    grpo.write_text(f"name: g\nmodel: {{source: '{tiny_model}', family: llama}}\ntrain: {{method: grpo}}\n"
                    "grpo: {rewards: [exact_match]}\nlora: {targets: [self_attn.q_proj], num_layers: 2}\n")
    ok = CliRunner().invoke(main, ["data", "check", str(src), "--recipe", str(grpo)])
    assert ok.exit_code == 0, ok.output
    sft = CliRunner().invoke(main, ["data", "check", str(src), "--model", str(tiny_model)])
    assert sft.exit_code == 1 and "prompts.jsonl:1: error: conversation has no assistant turn" in sft.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": 7}) + "\n" + json.dumps({"prompt": "fine"}) + "\n")
    out = CliRunner().invoke(main, ["data", "check", str(bad), "--recipe", str(grpo)])
    assert out.exit_code == 1 and "bad.jsonl:1: error: prompt must be a string" in out.output
    assert "Traceback" not in out.output

NO_ROWS = {  # file content -> the reason every entry point must give
    "header.csv": (b"prompt,completion\n", "only a header line (columns: prompt, completion)"),
    "empty.json": (b"[]", "the JSON array is empty"),
    "other.csv": (b"question,answer\nq,a\n", "columns found (answer, question) match no known format"),
}


@pytest.mark.parametrize("name", sorted(NO_ROWS))
def test_no_usable_rows_is_an_error_at_every_entry_point(name, tmp_path):
    from mlxft.data.encode import read_chat_jsonl
    from mlxft.errors import DataError
    from mlxft.data.check import check_path
    from mlxft.data.synth import read_seeds

    data, reason = NO_ROWS[name]
    src = tmp_path / name
    src.write_bytes(data)
    report = check_path(src)  # data check
    assert not report.ok and any(reason in p.message for p in report.errors)
    assert "OK to train" not in report.format()
    with pytest.raises(DataError, match="nothing written"):  # data prepare
        prepare_dataset(src, tmp_path / "out")
    folder = tmp_path / "splits"  # train reads train + valid through load_splits
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"messages": CHAT}) + "\n")
    (folder / ("valid" + src.suffix)).write_bytes(data)
    with pytest.raises(DataError, match="valid"):
        load_splits(folder)
    if name != "other.csv":  # a seed may be any object with a text field; a chat row with none is still refused
        with pytest.raises(DataError, match=reason.split(" (")[0]):  # synth seeds
            read_seeds(src)
    blank = tmp_path / "blank.jsonl"  # eval suites and few-shot files read chat JSONL
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="no rows"):
        read_chat_jsonl(blank, need_role="user")
    assert src.read_bytes() == data
