"""What mlxft can do with each mlx-lm model family (the module name under `mlx_lm.models`).

One table, read by the training loss, the speed paths, the fast kernels and the memory plan, so a
new family is enabled in one place. A family missing from a set simply takes mlx-lm's own path.
"""

from __future__ import annotations

# Model is `lm_head(model(inputs))` (or tied embeddings) with nothing in between, so hidden states
# can be gathered at supervised positions before the head (mlxft/training/loss.py).
SPARSE_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3_text"})

# Blocks take mlx-lm's cache protocol (offset + update_and_fetch) and their attention has a
# `rope` module: the shared-prefix forward and packing can drive them (mlxft/training/fast/).
SHARED_PREFIX = frozenset({"llama", "mistral", "qwen2", "qwen3"})
PACKING = SHARED_PREFIX

# The MLP is `down(swiglu(gate(x), up(x)))` with mlx-lm's activations.swiglu (fast SiLU swap).
SWIGLU = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3")
# The attention calls mlx-lm's base.scaled_dot_product_attention by that name (fused softmax swap).
FUSED_ATTENTION = SWIGLU + ("gemma3_text",)
