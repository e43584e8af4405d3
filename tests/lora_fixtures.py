"""Tiny run folders with hand-made LoRA adapters: strong enough to change greedy answers, built in a second.

Training a few steps would also do, but random LoRA tensors make the answers differ
from the base for sure, which is what the serve and fuse tests need to mean something.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxft  # noqa: F401
import mlx.core as mx

from conftest import CHATML, SYSTEM

# A second template, so that one adapter proves the server uses each adapter's own template.
BRACKETS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>[' + message['role'] + ']\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>[assistant]\n' }}{% endif %}"
)


def make_adapter_run(root: Path, base: Path, seed: int, system_prompt: str | None, chat_template: str = CHATML,
                     keys=("self_attn.q_proj", "self_attn.v_proj"), rank: int = 4, data_dir: Path | None = None) -> Path:
    """A run folder (config.json + adapters/) whose LoRA tensors are random and large."""
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    model, _ = load(str(base))
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": 10.0, "dropout": 0.0, "keys": list(keys)})
    mx.random.seed(seed)
    weights = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            weights[f"{name}.lora_a"] = m.lora_a
            weights[f"{name}.lora_b"] = mx.random.normal(m.lora_b.shape) * 0.2
    run = Path(root)
    (run / "adapters").mkdir(parents=True)
    mx.save_safetensors(str(run / "adapters" / "adapters.safetensors"), weights)
    lora = {"rank": rank, "scale": 10.0, "dropout": 0.0, "keys": list(keys)}
    acfg = {"fine_tune_type": "lora", "num_layers": len(model.layers), "lora_parameters": lora,
            "base_model": str(base), "system_prompt": system_prompt, "chat_template": chat_template}
    (run / "adapters" / "adapter_config.json").write_text(json.dumps(acfg))
    cfg = {"recipe": {"name": "tiny", "model": {"source": str(base)}, "quantize": None},
           "data": {"path": str(data_dir) if data_dir else None},
           "chat_template": chat_template, "system_prompt": system_prompt}
    (run / "config.json").write_text(json.dumps(cfg))
    return run


LORA_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"]


def lora_model(path: Path, num_layers: int = 1, dropout: float = 0.0, keys=LORA_KEYS, seed: int | None = None):
    """(model, tokenizer) with rank-4 LoRA on the last `num_layers` blocks and non-zero B: a fresh
    LoRA is an identity, so its gradients (and the prefix keys/values it changes) would test little."""
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    if seed is not None:
        mx.random.seed(seed)
    model, tok = load(str(path))
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": 4, "scale": 2.0, "dropout": dropout, "keys": list(keys)})
    for name, p in tree_flatten(model.trainable_parameters()):
        if name.endswith("lora_b"):
            model.update(tree_unflatten([(name, mx.random.normal(p.shape) * 0.05)]))
    return model, tok


def encoded_rows(tok, data: Path, n: int = 8):
    """The first `n` training rows of a tiny data folder, encoded with the test system prompt."""
    from mlxft.data.encode import encode_rows, read_chat_jsonl

    return encode_rows(tok, read_chat_jsonl(data / "train.jsonl")[:n], SYSTEM, 64)


def assert_grads_close(grads, ref, rtol: float = 1e-4) -> None:
    """Same gradient tree, every tensor within rtol of the reference's largest magnitude."""
    from mlx.utils import tree_flatten

    flat, ref_flat = dict(tree_flatten(grads)), dict(tree_flatten(ref))
    assert flat.keys() == ref_flat.keys() and flat
    for name, g in flat.items():
        scale = float(mx.abs(ref_flat[name]).max().item()) + 1e-12
        assert float(mx.abs(g - ref_flat[name]).max().item()) <= rtol * scale, name


def assert_matches_full_rows(model, rows, loss, grads, n_tok: int, n_sup: int, family: str = "llama",
                             loss_rtol: float = 1e-5) -> mx.array:
    """A speed path's (loss, grads, token counts) equal the plain full-row path's on the same rows;
    returns the plain loss."""
    import mlx.nn as nn

    from mlxft.training.sft import collate, make_loss

    inputs, targets, idx, n_tok_f, n_sup_f = collate(rows)
    loss_f, grads_f = nn.value_and_grad(model, make_loss(model, family))(model, inputs, targets, idx)
    assert (n_tok, n_sup) == (n_tok_f, n_sup_f)
    assert abs(loss.item() - loss_f.item()) <= loss_rtol * abs(loss_f.item())
    assert_grads_close(grads, grads_f)
    return loss_f
