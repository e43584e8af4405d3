"""Tiny runs on three families for the export tests: llama and qwen2 from Hugging Face folders,
gemma3 from a GGUF (as the bundled models are), each with a strong random LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import mlxft  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from conftest import CHATML, SYSTEM, make_tiny_llama, write_tokenizer
from lora_fixtures import make_adapter_run

ALL_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_tiny_qwen2(out: Path) -> Path:
    """A random 2-layer qwen2 (biased q/k/v, untied head, random norms) with the conftest tokenizer."""
    from mlx_lm.models import qwen2

    out.mkdir(parents=True)
    vocab = write_tokenizer(out, CHATML)
    config = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab,
              "rope_theta": 1e6, "tie_word_embeddings": False, "max_position_embeddings": 256,
              "eos_token_id": vocab - 1}
    mx.random.seed(5)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        if "norm" in k or k.endswith("bias"):  # ones and zeros would hide a swapped or dropped tensor
            weights[k] = mx.random.uniform(0.5, 1.5, v.shape) if "norm" in k else mx.random.normal(v.shape) * 0.5
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


def tiny_run(root: Path, family: str, data_dir: Path) -> Path:
    """A run folder on a tiny base of `family` (llama, qwen2, gemma3) with LoRA on every linear layer."""
    if family == "gemma3":
        from test_gguf_gemma import write_tiny_gemma3

        from mlxft.gguf import GEMMA_CHAT_TEMPLATE, import_gguf

        gguf_path = root / "tiny-gemma3.gguf"
        root.mkdir(parents=True, exist_ok=True)
        write_tiny_gemma3(gguf_path)
        folder = import_gguf(gguf_path, root / "gemma3-folder", dequantize="fp32")
        run = make_adapter_run(root / "run", folder, seed=4, system_prompt=SYSTEM, chat_template=GEMMA_CHAT_TEMPLATE,
                               keys=ALL_LINEAR, data_dir=data_dir)
        config = json.loads((run / "config.json").read_text())
        config["recipe"]["model"]["source"] = str(gguf_path)  # trained on the GGUF, like builtin: models
        (run / "config.json").write_text(json.dumps(config))
        return run
    base = make_tiny_llama(root / "tiny-llama") if family == "llama" else make_tiny_qwen2(root / "tiny-qwen2")
    return make_adapter_run(root / "run", base, seed=4, system_prompt=SYSTEM, keys=ALL_LINEAR, data_dir=data_dir)


def fused_reference(run: Path):
    """(model, tokenizer) of the run's base + adapter fused in MLX, as the run's base loads on this backend."""
    from mlx_lm.tuner.utils import load_adapters

    from mlxft.fuse import fuse_layers
    from mlxft.models import load_run_base

    config = json.loads((run / "config.json").read_text())
    base = load_run_base(config)
    load_adapters(base.model, str(run / "adapters"))
    fuse_layers(base.model)
    base.tokenizer._tokenizer.chat_template = config["chat_template"]
    return base.model, base.tokenizer


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]
