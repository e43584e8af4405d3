"""Masking and template parity on real token ids."""

import json

import numpy as np
import pytest

from mlxft.data import encode_conversation, prompt_ids, read_chat_jsonl, with_system_prompt
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
