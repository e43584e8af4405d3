"""gguf_vocab: the tokenizer keys of an export, from a Hugging Face folder or from the base's own GGUF."""

import json

import pytest
from conftest import make_tiny_llama
from gguf_fixtures import write_tiny_gemma3

from mlxft.errors import ModelError
from mlxft.models.gguf import read_gguf_header
from mlxft.export.gguf_vocab import hf_tokenizer_metadata, pre_tokenizer_name, tokenizer_metadata

TRAINED = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def test_hf_byte_level_bpe_becomes_llama_cpps_gpt2_tokenizer(tmp_path):
    folder = make_tiny_llama(tmp_path / "tiny")
    meta = tokenizer_metadata(folder, None, TRAINED)
    spec = json.loads((folder / "tokenizer.json").read_text())
    tokens = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert len(tokens) == len(spec["model"]["vocab"]) + len(spec["added_tokens"])
    assert meta["tokenizer.ggml.token_type"][tokens.index("<|im_end|>")] == 3  # control: matched whole, never split
    assert meta["tokenizer.ggml.merges"][:2] == ["a l", "e t"]
    assert tokens[meta["tokenizer.ggml.eos_token_id"]] == "<|im_end|>" and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == TRAINED  # the trained template, not the base's ChatML


def test_pre_tokenizers_are_named_as_llama_cpp_names_them():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert pre_tokenizer_name(byte_level) == "gpt-2"
    assert pre_tokenizer_name({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}) == "smollm"
    with pytest.raises(ModelError, match="pre-tokenizer"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_a_non_byte_level_folder_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ModelError, match="export from a base imported from a GGUF"):
        hf_tokenizer_metadata(tmp_path)


def test_a_gguf_base_gives_its_own_tokenizer_back_with_the_trained_template(tmp_path):
    path = tmp_path / "g.gguf"
    write_tiny_gemma3(path)
    source = read_gguf_header(path)[0]
    meta = tokenizer_metadata(tmp_path / "unused", path, TRAINED)
    assert meta["tokenizer.ggml.scores"] == source["tokenizer.ggml.scores"]
    assert {k: v for k, v in meta.items() if k != "tokenizer.chat_template"} == \
        {k: v for k, v in source.items() if k.startswith("tokenizer.")}
    assert meta["tokenizer.chat_template"] == TRAINED
