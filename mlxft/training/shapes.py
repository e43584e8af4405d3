"""Model shapes for the memory plan: from a model's config.json on disk, or the published shapes of
the recipes' hub models (so `mlxft plan` works before a download)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from mlxft.errors import ConfigError, ModelError
from mlxft.models.load import BUILTIN_PREFIX, resolve_model

# Published config.json shapes of the recipes' hub models, so `mlxft plan` works before a download.
KNOWN_SHAPES = {
    "mlx-community/Llama-3.2-1B-Instruct-bf16": dict(layers=16, hidden=2048, inter=8192, heads=32, kv=8, hd=64, vocab=128256, tied=True, bits=16),
    "mlx-community/Llama-3.2-3B-Instruct-4bit": dict(layers=28, hidden=3072, inter=8192, heads=24, kv=8, hd=128, vocab=128256, tied=True, bits=4),
    "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit": dict(layers=32, hidden=4096, inter=14336, heads=32, kv=8, hd=128, vocab=128256, tied=False, bits=4),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(layers=24, hidden=896, inter=4864, heads=14, kv=2, hd=64, vocab=151936, tied=True, bits=16),
    "mlx-community/Qwen2.5-7B-Instruct-4bit": dict(layers=28, hidden=3584, inter=18944, heads=28, kv=4, hd=128, vocab=152064, tied=False, bits=4),
    "mlx-community/Qwen3-4B-Instruct-2507-4bit": dict(layers=36, hidden=2560, inter=9728, heads=32, kv=8, hd=128, vocab=151936, tied=True, bits=4),
    "mlx-community/Mistral-7B-Instruct-v0.3-4bit": dict(layers=32, hidden=4096, inter=14336, heads=32, kv=8, hd=128, vocab=32768, tied=False, bits=4),
    "mlx-community/Phi-3.5-mini-instruct-4bit": dict(layers=32, hidden=3072, inter=8192, heads=32, kv=32, hd=96, vocab=32064, tied=False, bits=4),
    "mlx-community/gemma-3-1b-it-bf16": dict(layers=26, hidden=1152, inter=6912, heads=4, kv=1, hd=256, vocab=262144, tied=True, bits=16),
    "mlx-community/Qwen3-30B-A3B-Instruct-2507-4bit": dict(layers=48, hidden=2048, inter=768, heads=32, kv=4, hd=128, vocab=151936, tied=False, bits=4, experts=128, active=8),
}


@dataclass
class Shape:
    layers: int
    hidden: int
    inter: int
    heads: int
    kv: int
    hd: int
    vocab: int
    tied: bool
    bits: int = 16  # the source's precision: 4/8 quantized, 16 (bf16/fp16) or 32
    experts: int = 0  # MoE: experts per block (0 = dense) and experts active per token
    active: int = 0

    def block_params(self) -> int:
        attn = self.hidden * self.heads * self.hd * 2 + 2 * self.hidden * self.kv * self.hd
        mlp = 3 * self.hidden * self.inter * max(self.experts, 1)
        return attn + mlp

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.block_params() + embed


def shape_of(source: str) -> Shape:
    """The model's shape from its config.json on disk, else from KNOWN_SHAPES."""
    config = _local_config(source)
    if config is None:
        if source in KNOWN_SHAPES:
            return Shape(**KNOWN_SHAPES[source])
        raise ConfigError(f"cannot plan for model '{source}': it is not on disk and its shape is not in mlxft/training/plan.py KNOWN_SHAPES")
    return shape_from_config(config)


def shape_from_config(c: dict) -> Shape:
    c = {**c, **(c.get("text_config") or {})}
    heads = c["num_attention_heads"]
    q = c.get("quantization") or {}
    dtype = str(c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    bits = q.get("bits") or (32 if "32" in dtype else 16)
    return Shape(
        layers=c["num_hidden_layers"], hidden=c["hidden_size"],
        inter=c["moe_intermediate_size"] if c.get("num_experts") else c["intermediate_size"],
        heads=heads, kv=c.get("num_key_value_heads", heads), hd=c.get("head_dim") or c["hidden_size"] // heads,
        vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)), bits=bits,
        experts=c.get("num_experts") or 0, active=c.get("num_experts_per_tok") or 0,
    )


def _local_config(source: str) -> dict | None:
    if not (source.startswith(BUILTIN_PREFIX) or Path(source).expanduser().exists()):
        try:
            path = Path(snapshot_download(source, allow_patterns=["config.json"], local_files_only=True))
            return json.loads((path / "config.json").read_text())
        except Exception:
            return None
    try:
        path = resolve_model(source, dequantize="fp32" if source.startswith(BUILTIN_PREFIX) or source.endswith(".gguf") else None)
    except ModelError:
        return None
    config = json.loads((path / "config.json").read_text())
    dtype = _safetensors_dtype(path)
    if dtype and not config.get("quantization"):  # mlx-lm loads the stored dtype, whatever config.json says
        config["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(dtype, config.get("torch_dtype"))
    return config


def _safetensors_dtype(path: Path) -> str | None:
    """The dtype of the first floating-point tensor in the folder's first safetensors file (header only)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    with open(files[0], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return next((v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))), None)
