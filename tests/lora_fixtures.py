"""Tiny run folders with hand-made LoRA adapters: strong enough to change greedy answers, built in a second.

Training a few steps would also do, but random LoRA tensors make the answers differ
from the base for sure, which is what the serve and fuse tests need to mean something.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlxft  # noqa: F401
import mlx.core as mx

from conftest import CHATML

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
