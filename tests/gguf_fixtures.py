"""Tiny GGUF files written with the `gguf` package's GGUFWriter (llama.cpp's own writer), shared by the
GGUF import tests (tests/models/) and the export tests (tests/export/)."""

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

G = dict(hidden=256, ff=512, heads=2, kv=1, head_dim=64, layers=2, window=4, pattern=2)
PIECES = ["▁", "t", "h", "e", "c", "a", "s", "i", "o", "n", "r", "d", "x", "1", "2", "é",
          "th", "▁t", "he", "▁the", "at", "▁c", "▁cat", "is", "▁is", "on", "▁on", "in", "▁in",
          "re", "▁re", "ed", "er", "the", "ca", "▁ca", "as", "▁a", "▁as", "▁h", "▁he"]


def gemma_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    types = [3, 3, 3, 2, 3, 3, 4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    tokens += PIECES
    types += [1] * len(PIECES)
    # Normal pieces score by rank; the rest score 0 as llama.cpp's converter writes them.
    scores = [0.0] * (len(tokens) - len(PIECES)) + [-float(i) for i in range(len(PIECES))]
    # Make a longer piece outrank its parts, so merge order is not just "left to right".
    scores[tokens.index("▁cat")] = 5.0
    return tokens, scores, types


# (module in mlx-lm, GGUF name, type): written independently of mlxft.models.gguf's table.
GEMMA_TENSORS = [
    ("self_attn.q_proj", "attn_q", Q.Q4_K), ("self_attn.k_proj", "attn_k", Q.Q5_0),
    ("self_attn.v_proj", "attn_v", Q.Q8_0), ("self_attn.o_proj", "attn_output", Q.Q4_1),
    ("mlp.gate_proj", "ffn_gate", Q.Q5_K), ("mlp.up_proj", "ffn_up", Q.Q3_K),
    ("mlp.down_proj", "ffn_down", Q.Q6_K),
]
GEMMA_NORMS = [
    ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attention_norm"),
    ("pre_feedforward_layernorm", "ffn_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
    ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm"),
]
# Byte offsets of the float16 super-block scales in K-quant blocks (ggml-common.h layouts).
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def quantized(rng, qtype, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF blocks, their float values as the gguf package dequantizes them)."""
    if qtype in K_SCALES:  # gguf cannot quantize K-quants: random blocks with sane scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for at in K_SCALES[qtype]:
            raw[..., at:at + 2] = np.frombuffer(np.float16(rng.uniform(2e-4, 1e-3)).tobytes(), np.uint8)
        raw = raw.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.normal(0, 0.05, (rows, cols)).astype(np.float32), qtype)
    values = gguf.quants.dequantize(raw, qtype)
    assert values.shape == (rows, cols) and np.isfinite(values).all()
    return raw, values


def write_tiny_gemma3(path, seed=0, split_max_tensors=0):
    """A random 2-layer gemma3 GGUF written the way llama.cpp writes one (norms stored as 1 + w).

    Returns the mlx-lm weights it stands for.
    """
    rng = np.random.default_rng(seed)
    tokens, scores, types = gemma_vocab()
    H, F, D = G["hidden"], G["ff"], G["heads"] * G["head_dim"]
    shapes = {"self_attn.q_proj": (D, H), "self_attn.k_proj": (G["kv"] * G["head_dim"], H),
              "self_attn.v_proj": (G["kv"] * G["head_dim"], H), "self_attn.o_proj": (H, D),
              "mlp.gate_proj": (F, H), "mlp.up_proj": (F, H), "mlp.down_proj": (H, F)}
    w = gguf.GGUFWriter(path, "gemma3", split_max_tensors=split_max_tensors)
    w.add_name("tiny gemma3")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(G["layers"])
    w.add_feed_forward_length(F)
    w.add_head_count(G["heads"])
    w.add_head_count_kv(G["kv"])
    w.add_key_length(G["head_dim"])
    w.add_value_length(G["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(G["window"])
    w.add_sliding_window_pattern(G["pattern"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)

    source = {}
    raw, source["model.embed_tokens.weight"] = quantized(rng, Q.Q8_0, len(tokens), H)
    w.add_tensor("token_embd.weight", raw, raw_dtype=Q.Q8_0)
    norm = rng.normal(0, 0.3, H).astype(np.float32)
    source["model.norm.weight"] = norm
    w.add_tensor("output_norm.weight", norm + 1)
    for n in range(G["layers"]):
        for module, name, qtype in GEMMA_TENSORS:
            if n == 1 and qtype == Q.Q3_K:
                qtype = Q.Q2_K  # both low-bit K-quants get a turn
            raw, source[f"model.layers.{n}.{module}.weight"] = quantized(rng, qtype, *shapes[module])
            w.add_tensor(f"blk.{n}.{name}.weight", raw, raw_dtype=qtype)
        for module, name in GEMMA_NORMS:
            size = G["head_dim"] if "self_attn" in module else H
            norm = rng.normal(0, 0.3, size).astype(np.float32)
            source[f"model.layers.{n}.{module}.weight"] = norm
            w.add_tensor(f"blk.{n}.{name}.weight", norm + 1)  # llama.cpp's converter adds 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return source
