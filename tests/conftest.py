"""Shared fixtures: a tiny random-weight llama with a real byte-level BPE tokenizer.

Tests never touch the network. Tests on the real bundled SmolLM2 are marked slow.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SYSTEM = "Label the message."
LABELS = ["alpha", "beta", "gamma"]


def write_tokenizer(out: Path, chat_template: str | None = CHATML) -> int:
    """A byte-level BPE (256 bytes + a few merges + ChatML specials); returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("a", "l"), ("e", "t"), ("Ġ", "t"), ("b", "et")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
    }
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tok.get_vocab_size()


def make_tiny_llama(out: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    from mlx_lm.models import llama

    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(out, chat_template)
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": vocab_size - 1,
        "max_position_embeddings": 2048,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A learnable toy task: the answer is the word repeated in the message."""
    import random

    rng = random.Random(0)
    out = tmp_path_factory.mktemp("data")
    seen: set[str] = set()  # unique rows: `mlxft data check` (run before training) refuses split leakage
    for split, n in (("train", 64), ("valid", 16), ("test", 12)):
        with open(out / f"{split}.jsonl", "w") as f:
            written = 0
            while written < n:
                label = rng.choice(LABELS)
                noise = " ".join(rng.choice(["x", "y", "z", "w"]) for _ in range(rng.randint(2, 7)))
                content = f"{label} {noise}"
                if content in seen:
                    continue
                seen.add(content)
                row = {
                    "messages": [
                        {"role": "system", "content": SYSTEM},
                        {"role": "user", "content": content},
                        {"role": "assistant", "content": label},
                    ]
                }
                f.write(json.dumps(row) + "\n")
                written += 1
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Runs go to tmp; converted models share one cache per session (conversion is slow)."""
    monkeypatch.setenv("MLXFT_RUNS", str(tmp_path / "runs"))
    if "MLXFT_CACHE" not in os.environ:
        monkeypatch.setenv("MLXFT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "mlxft"))
