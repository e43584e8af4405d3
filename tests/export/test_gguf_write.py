"""gguf_write: the importer's family table read backwards, llama.cpp's layouts, the gguf package's encoders."""

import json

import mlxft  # noqa: F401
import gguf
import numpy as np
import pytest
from conftest import make_tiny_llama
from mlx.utils import tree_flatten
from mlx_lm.utils import load

from mlxft.errors import ModelError
from mlxft.models.gguf_import import import_gguf
from mlxft.models.gguf import read_gguf_header
from mlxft.export.gguf_vocab import tokenizer_metadata
from mlxft.export.gguf_write import (architecture_metadata, encode, family_of, gguf_base_name, lora_tensors, permute_rows,
                              unpermute_rows, write_lora_gguf, write_model_gguf)

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "num_hidden_layers": 2, "intermediate_size": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def test_names_and_offsets_are_the_import_table_inverted():
    llama, gemma = family_of(LLAMA), family_of({"model_type": "gemma3_text"})
    assert gguf_base_name(llama, "model.layers.7.self_attn.q_proj") == "blk.7.attn_q"
    assert gguf_base_name(llama, "lm_head") == "output"
    assert gguf_base_name(gemma, "model.layers.0.pre_feedforward_layernorm") == "blk.0.ffn_norm"
    assert llama.permuted == {"blk.{n}.attn_q": "attention.head_count", "blk.{n}.attn_k": "attention.head_count_kv"}
    assert gemma.offsets["blk.{n}.attn_norm"] == 1.0 and not gemma.permuted  # Gemma's norms get llama.cpp's +1 back
    with pytest.raises(ModelError, match="not supported"):
        family_of({"model_type": "phi3"})
    with pytest.raises(ModelError, match="no llama.cpp tensor"):
        gguf_base_name(llama, "model.layers.0.mlp.experts")


def test_rotary_permutation_round_trips_and_matches_llama_cpps_order():
    rows = np.arange(4 * 8 * 3, dtype=np.float32).reshape(32, 3)  # 4 heads of dim 8
    assert np.array_equal(unpermute_rows(permute_rows(rows, 4), 4), rows)
    # llama.cpp per head: rows 0, 4, 1, 5, 2, 6, 3, 7 (the halves interleaved in pairs)
    assert permute_rows(rows, 4)[:8, 0].tolist() == rows[[0, 4, 1, 5, 2, 6, 3, 7], 0].tolist()


def test_encoding_keeps_1d_in_f32_and_falls_back_to_f16_for_partial_blocks():
    rng = np.random.default_rng(0)
    assert encode(rng.normal(size=64).astype(np.float32), "q8_0")[2] == "F32"
    assert encode(rng.normal(size=(4, 48)).astype(np.float32), "q8_0")[2] == "F16"  # 48 is not whole blocks of 32
    data, qtype, name = encode(rng.normal(size=(4, 64)).astype(np.float32), "q8_0")
    assert name == "Q8_0" and qtype == gguf.GGMLQuantizationType.Q8_0 and data.dtype == np.uint8


def test_metadata_refuses_what_llama_cpp_cannot_express():
    meta = architecture_metadata(LLAMA, family_of(LLAMA))
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.attention.head_count_kv"] == 2
    with pytest.raises(ModelError, match="rope scaling 'llama3'"):
        architecture_metadata({**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, family_of(LLAMA))
    gemma = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
             "intermediate_size": 128, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
             "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}
    assert architecture_metadata(gemma, family_of(gemma))["gemma3.attention.sliding_window_pattern"] == 6
    with pytest.raises(ModelError, match="query_pre_attn_scalar"):
        architecture_metadata({**gemma, "query_pre_attn_scalar": 64}, family_of(gemma))


def test_lora_tensors_use_llama_cpps_shapes_and_alpha(tmp_path):
    """llama.cpp: lora_a is (rank, in) and lora_b (out, rank) in numpy order, scale = alpha / rank."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(64, 4)).astype(np.float32), rng.normal(size=(4, 64)).astype(np.float32)
    adapter = {"model.layers.1.self_attn.q_proj.lora_a": a, "model.layers.1.self_attn.q_proj.lora_b": b,
               "model.layers.1.mlp.down_proj.lora_a": rng.normal(size=(128, 4)).astype(np.float32),
               "model.layers.1.mlp.down_proj.lora_b": rng.normal(size=(4, 64)).astype(np.float32)}
    out = lora_tensors(adapter, LLAMA)
    assert out["blk.1.attn_q.weight.lora_a"].shape == (4, 64) and out["blk.1.ffn_down.weight.lora_a"].shape == (4, 128)
    delta = out["blk.1.attn_q.weight.lora_b"] @ out["blk.1.attn_q.weight.lora_a"]
    np.testing.assert_allclose(unpermute_rows(delta, 4), (a @ b).T, rtol=1e-5, atol=1e-5)  # q rows permuted
    write_lora_gguf(tmp_path / "a.gguf", adapter, LLAMA, scale=2.0, rank=4)
    metadata, tensors = read_gguf_header(tmp_path / "a.gguf")
    assert (metadata["general.type"], metadata["adapter.type"], metadata["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    assert tensors["blk.1.attn_q.weight.lora_b"].shape == (64, 4)
    with pytest.raises(ModelError, match="DoRA"):
        lora_tensors({"model.layers.1.self_attn.q_proj.m": a[:, 0]}, LLAMA)


def test_q8_0_file_holds_the_weights_to_q8_0_rounding(tmp_path):
    """The q8_0 writer, checked on the weights themselves (the export gate checks logits)."""
    folder = make_tiny_llama(tmp_path / "tiny")
    model, _ = load(str(folder))
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    config = json.loads((folder / "config.json").read_text())
    counts = write_model_gguf(tmp_path / "m.gguf", weights, config, tokenizer_metadata(folder, None, None), "q8_0")
    assert counts == {"Q8_0": 15, "F32": 5}
    back, _ = load(str(import_gguf(tmp_path / "m.gguf", tmp_path / "back", dequantize="fp32")))
    for name, value in tree_flatten(back.parameters()):
        want = weights[name]
        step = np.abs(want).max() / 127  # Q8_0: int8 times one scale per 32 weights, at worst the tensor's max
        assert np.abs(np.array(value) - want).max() <= (0 if want.ndim == 1 else step), name
