"""export_check: where the check prompts come from, the LoRA GGUF reader, and a gate per writable type."""


import numpy as np
import pytest

from mlxft.runs.run import Run
from mlxft.export.check import THRESHOLDS, ExportError, check_conversations, read_lora_gguf
from mlxft.export.gguf_write import WRITABLE, write_lora_gguf, write_model_gguf

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 128}


def test_every_writable_type_has_a_gate():
    assert set(THRESHOLDS) == set(WRITABLE)
    bounds = [THRESHOLDS[q][1] for q in ("f32", "f16", "q8_0", "q4_0")]
    assert bounds == sorted(bounds)  # coarser types, looser bounds


def test_check_prompts_come_from_each_eval_suite_in_turn_with_the_run_system_prompt():
    config = {"recipe": {"eval": {"suites": ["commit-type", "safety"]}}, "system_prompt": "Label it."}
    convs, source = check_conversations(Run(None, config), 4)
    assert source == "eval suites commit-type, safety" and len(convs) == 4
    assert convs[0][0]["role"] == "system" and convs[0] != convs[1]


def test_without_suites_the_test_split_is_used(tiny_data):
    convs, source = check_conversations(Run(None, {"data": {"path": str(tiny_data)}, "system_prompt": "S"}), 3)
    assert source.endswith("test.jsonl") and len(convs) == 3 and convs[0][-1]["role"] == "user"


def test_lora_reader_returns_alpha_and_pairs_and_refuses_a_model_file(tmp_path):
    rng = np.random.default_rng(0)
    adapter = {"model.layers.0.self_attn.v_proj.lora_a": rng.normal(size=(64, 2)).astype(np.float32),
               "model.layers.0.self_attn.v_proj.lora_b": rng.normal(size=(2, 32)).astype(np.float32)}
    write_lora_gguf(tmp_path / "a.gguf", adapter, LLAMA, scale=3.0, rank=2)
    alpha, pairs = read_lora_gguf(tmp_path / "a.gguf")
    a, b = pairs["blk.0.attn_v.weight"]
    assert alpha == 6.0 and a.shape == (2, 64) and b.shape == (32, 2)
    np.testing.assert_array_equal(b @ a, (adapter["model.layers.0.self_attn.v_proj.lora_a"]
                                          @ adapter["model.layers.0.self_attn.v_proj.lora_b"]).T)
    tokenizer = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []}
    write_model_gguf(tmp_path / "m.gguf", {"model.embed_tokens.weight": np.zeros((2, 64), np.float32)}, LLAMA,
                     tokenizer, "f32")
    with pytest.raises(ExportError, match="not a LoRA adapter"):
        read_lora_gguf(tmp_path / "m.gguf")
