"""Masking and template parity on real token ids."""

import json

import numpy as np
import pytest

from mlxft.data.encode import encode_conversation, prompt_ids, read_chat_jsonl, with_system_prompt
from mlxft.errors import DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.utils import load

    return load(str(tiny_model))[1]


def test_three_turn_mask_matches_hand_computed(tokenizer):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
    ]
    enc = encode_conversation(tokenizer, msgs)
    # By hand: the rendered text is ChatML; supervised = each assistant content + its <|im_end|>.
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert enc.ids.tolist() == ids
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    expected = np.zeros(len(ids), dtype=bool)
    for i in range(len(ids)):
        if ids[i : i + len(header)] == header:
            j = i + len(header)
            while ids[j] != im_end:
                expected[j] = True
                j += 1
            expected[j] = True  # the end-of-turn token is learned
    assert expected.sum() == 3 * (len(tokenizer.encode("a1", add_special_tokens=False)) + 1)
    assert enc.mask.tolist() == expected.tolist()
    # role headers are never supervised
    assert not any(enc.mask[i] for i in range(len(ids)) if ids[i] == tokenizer.convert_tokens_to_ids("<|im_start|>"))


def test_training_prompt_is_inference_prompt(tokenizer):
    """Parity: the ids before the assistant's answer in training == the ids generate builds."""
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "alpha"}]
    full = with_system_prompt(msgs, "Be terse.")
    enc = encode_conversation(tokenizer, full)
    first_supervised = int(np.argmax(enc.mask))
    assert enc.ids[:first_supervised].tolist() == prompt_ids(tokenizer, msgs[:1], "Be terse.")


def test_truncation_keeps_prefix(tokenizer):
    msgs = [{"role": "user", "content": "x " * 50}, {"role": "assistant", "content": "alpha"}]
    enc = encode_conversation(tokenizer, msgs, max_length=16)
    assert len(enc.ids) == 16 and len(enc.mask) == 16


def test_bad_rows_name_file_and_line(tmp_path):
    p = tmp_path / "train.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    p.write_text(good + "\n{not json\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: invalid JSON"):
        read_chat_jsonl(p)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: conversation has no assistant turn"):
        read_chat_jsonl(p)
    p.write_bytes(b"\xff\xfe\n")
    with pytest.raises(DataError, match="UTF-8"):
        read_chat_jsonl(p)


def test_template_less_base_gets_the_default_template_and_parity(tmp_path):
    """A base model with no chat template trains and infers with models.DEFAULT_CHAT_TEMPLATE."""
    from conftest import make_tiny_llama

    from mlxft.data.encode import load_tokenizer
    from mlxft.models.load import DEFAULT_CHAT_TEMPLATE, load_base

    path = make_tiny_llama(tmp_path / "no-template", chat_template=None)
    base = load_base(str(path))
    assert base.default_template and base.tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    tok, default = load_tokenizer(str(path))  # what `mlxft data check` renders with
    assert default and tok.chat_template == DEFAULT_CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "alpha"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "beta"}]
    enc = encode_conversation(base.tokenizer, with_system_prompt(msgs, "Be terse."))
    starts = [i for i in range(1, len(enc.mask)) if enc.mask[i] and not enc.mask[i - 1]]
    assert len(starts) == 2
    for start, upto in zip(starts, (1, 3)):  # each assistant turn's prompt == the inference prompt
        assert enc.ids[:start].tolist() == prompt_ids(base.tokenizer, msgs[:upto], "Be terse.")
        assert enc.ids[:start].tolist() == prompt_ids(tok, msgs[:upto], "Be terse.")


def test_batched_encoding_equals_encode_conversation(tokenizer):
    from mlxft.data.encode import encode_rows

    rows = [
        {"messages": [{"role": "user", "content": "x y"}, {"role": "assistant", "content": "alpha"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                      {"role": "assistant", "content": "a2 b2"}]},
    ]
    for max_length in (None, 12):
        batched = encode_rows(tokenizer, rows, "Sys", max_length)
        for row, enc in zip(rows, batched):
            ref = encode_conversation(tokenizer, with_system_prompt(row["messages"], "Sys"), max_length)
            assert enc.ids.tolist() == ref.ids.tolist() and enc.mask.tolist() == ref.mask.tolist()
    text = encode_rows(tokenizer, [{"text": "plain words"}], "Sys", None)[0]
    assert text.mask.all() and text.ids[-1] == tokenizer.eos_token_id


TOOL_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }})</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_calls_render_and_are_supervised(tmp_path):
    from conftest import make_tiny_llama

    from mlxft.data.encode import load_tokenizer
    from mlxft.data.check import check_path

    tok, _ = load_tokenizer(str(make_tiny_llama(tmp_path / "tools", chat_template=TOOL_CHATML)))
    msgs = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "12C"},
            {"role": "assistant", "content": "12C."}]
    enc = encode_conversation(tok, msgs)
    supervised = tok.decode(enc.ids[enc.mask].tolist())
    assert "get_weather" in supervised and "12C." in supervised and "weather?" not in supervised
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    assert check_path(tmp_path, None, tok).ok


def _varied_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Own prompt"}] if i % 5 == 0 else []
        for t in range(1 + i % 3):
            msgs += [{"role": "user", "content": f"question {i}.{t}  "}, {"role": "assistant", "content": f" answer {i} {t}\n"}]
        if i % 7 == 0:
            msgs.append({"role": "user", "content": "a last question nobody answers"})
        rows.append({"messages": msgs})
    return rows


# Content-dependent: strips content, and renders the final assistant turn differently.
QUIRKY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.last %}[final]{% endif %}{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", ["chatml", "default", "quirky"])
def test_renderer_equals_render_row(tokenizer, template):
    """The two-call Renderer gives exactly render_row's result on every row, fast path or not."""
    from mlxft.data.encode import Renderer, render_row
    from mlxft.models.load import DEFAULT_CHAT_TEMPLATE

    saved = tokenizer._tokenizer.chat_template
    if template != "chatml":
        tokenizer._tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE if template == "default" else QUIRKY
    try:
        render = Renderer(tokenizer, "Sys", probe_rows=4)
        rows = _varied_rows(40)
        assert [render(r) for r in rows] == [render_row(tokenizer, r, "Sys") for r in rows]
        # ChatML and the default template render messages one after another: cutting is provably right
        assert render.fast is (template != "quirky")
    finally:
        tokenizer._tokenizer.chat_template = saved


def test_renderer_falls_back_per_row_after_probe(tokenizer):
    """A row whose content the template treats specially after probing still renders exactly."""
    from mlxft.data.encode import Renderer, render_row

    render = Renderer(tokenizer, None, probe_rows=2)
    for r in _varied_rows(3):
        render(r)
    assert render.fast is True
    odd = {"messages": [{"role": "user", "content": "x \x00MLXFT0\x00 y"}, {"role": "assistant", "content": "z"}]}
    assert render(odd) == render_row(tokenizer, odd, None)
