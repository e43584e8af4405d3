"""Regenerate this bad-input corpus: python tests/data/bad/make_corpus.py

Every entry is broken or hostile; expected.json maps it to a phrase `mlxft data check`
must print (with the file's name). The 50 MB single line is made at test time instead.
"""

import json
from pathlib import Path

HERE = Path(__file__).parent


def msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


GOOD = json.dumps(msgs(("user", "hi"), ("assistant", "hello")))
GOOD2 = json.dumps(msgs(("user", "what is 2+2"), ("assistant", "4")))


def lines(*rows):
    return ("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n").encode()


CORPUS = {
    "truncated.jsonl": (lines(GOOD, GOOD2[:25]), "invalid JSON"),
    "content_int.jsonl": (lines(GOOD, msgs(("user", "q"), ("assistant", 123))), "must be a string"),
    "content_object.jsonl": (lines({"messages": [{"role": "user", "content": {"text": "q"}},
                                                 {"role": "assistant", "content": "a"}]}), "must be a string"),
    "messages_string.jsonl": (lines({"messages": "hello"}), "must be a list"),
    "messages_empty.jsonl": (lines({"messages": []}), "no messages"),
    "role_null.jsonl": (lines({"messages": [{"role": None, "content": "q"}]}), "needs a string 'role'"),
    "nul_bytes.jsonl": (lines(GOOD).replace(b"hello", b"hel\x00lo"), "NUL byte"),
    "binary.jsonl": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "NUL byte"),
    "mixed_formats.jsonl": (lines(GOOD, GOOD2, {"instruction": "add", "input": "1 1", "output": "2"}), "mixed formats"),
    "role_case.jsonl": (lines(msgs(("User", "q"), ("Assistant", "a"))), "did you mean 'user'"),
    "crlf_empty_answer.jsonl": (lines(GOOD, msgs(("user", "q"), ("assistant", ""))).replace(b"\n", b"\r\n"),
                                "empty content"),
    "whitespace_answer.jsonl": (lines(msgs(("user", "q"), ("assistant", "  \n\t "))), "empty content"),
    "deep_nesting.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
    "deep_nesting.json": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "empty.jsonl": (b"", "file is empty"),
    "blank_lines.jsonl": (b"\n\n   \n\r\n", "file is empty"),
    "utf16_bom.jsonl": (lines(GOOD).decode().encode("utf-16"), "UTF-16"),
    "utf8_bom_bad_role.jsonl": (b"\xef\xbb\xbf" + lines(msgs(("human", "q"), ("assistant", "a"))), "unknown role"),
    "latin1.jsonl": (lines(msgs(("user", "caf\u00e9"), ("assistant", "ok"))).decode().encode("latin-1"),
                     "not valid UTF-8"),
    "array_non_object.json": (json.dumps([msgs(("user", "q"), ("assistant", "a")), 42]).encode(), "got a JSON number"),
    "array_truncated.json": (json.dumps([msgs(("user", "q"), ("assistant", "a"))] * 3).encode()[:-30], "invalid JSON"),
    "json_not_array.json": (b'"just a string"', "expected a JSON array"),
    "line_is_array.jsonl": (lines(GOOD, "[1, 2, 3]"), "expected a JSON object"),
    "csv_missing_columns.csv": (b"instruction,input,output\nadd,1 1,2\nsubtract,3 1\n", "2 fields"),
    "csv_extra_columns.csv": (b"prompt,completion\nhi,hello,extra\n", "3 fields"),
    "csv_unknown_columns.csv": (b"foo,bar\n1,2\n", "unknown row shape"),
    "tsv_blank_header.tsv": (b"\tcompletion\nhi\thello\n", "header needs a name"),
    "unknown_shape.jsonl": (lines({"question": "q", "answer": "a"}), "unknown row shape"),
    "no_assistant.jsonl": (lines(msgs(("system", "s"), ("user", "q"))), "no assistant turn"),
    "assistant_first.jsonl": (lines(msgs(("assistant", "hi"), ("user", "q"), ("assistant", "a"))), "wrong role order"),
    "two_users.jsonl": (lines(msgs(("user", "a"), ("user", "b"), ("assistant", "c"))), "two user messages"),
    "system_in_middle.jsonl": (lines(msgs(("user", "a"), ("system", "s"), ("assistant", "c"))),
                               "only the first message may be system"),
    "tool_without_call.jsonl": (lines(msgs(("user", "a"), ("tool", "42"), ("assistant", "c"))), "no assistant tool call"),
    "bad_tool_calls.jsonl": (lines({"messages": [{"role": "user", "content": "a"},
                                                 {"role": "assistant", "content": "", "tool_calls": "f()"}]}),
                             "tool_calls must be a list"),
    "sharegpt_bad_speaker.jsonl": (lines({"conversations": [{"from": "Human", "value": "q"},
                                                           {"from": "gpt", "value": "a"}]}), "did you mean 'human'"),
    "alpaca_output_list.jsonl": (lines({"instruction": "q", "output": ["a", "b"]}), "must be a string"),
    "preference_bad_chosen.jsonl": (lines({"prompt": "q", "chosen": 5, "rejected": "no"}), "chosen must be a string"),
    "text_empty.jsonl": (lines({"text": ""}, {"text": "   "}), "empty text"),
    # files that hold no usable row at all: an error, never "OK to train" on 0 rows
    "header_only.csv": (b"prompt,completion\n", "only a header line (columns: prompt, completion)"),
    "header_only.tsv": (b"instruction\toutput\r\n\r\n", "only a header line (columns: instruction, output)"),
    "empty_array.json": (b"[ ]\n", "the JSON array is empty"),
    "null_rows.jsonl": (b"null\nnull\n", "got a JSON null"),
    "csv_no_known_format.csv": (b"question,answer\nq,a\n", "columns found (answer, question) match no known format"),
    "whitespace_only.jsonl": (b"  \n\t\n\r\n", "file is empty"),
}

FOLDERS = {
    "no_splits": ({"README.md": b"# notes\n", "notes.txt": b"nothing here\n"}, "no data files"),
    "leakage": ({"train.jsonl": lines(GOOD, GOOD2), "valid.jsonl": lines(GOOD2.replace("4", "4 "))}, "leakage"),
    "empty_train": ({"train.jsonl": b"", "valid.jsonl": lines(GOOD)}, "file is empty"),
    "all_rows_bad": ({"train.jsonl": lines(msgs(("user", "q"))), "valid.jsonl": lines({"messages": []})},
                     "no usable rows: each of the 2 rows has an error"),
}


def main():
    expected = {}
    for name, (data, phrase) in CORPUS.items():
        (HERE / name).write_bytes(data)
        expected[name] = phrase
    for name, (files, phrase) in FOLDERS.items():
        (HERE / name).mkdir(exist_ok=True)
        for fname, data in files.items():
            (HERE / name / fname).write_bytes(data)
        expected[name] = phrase
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
