"""What mlxft knows about each GGUF `general.architecture`: config.json from the metadata, tensor
names, llama.cpp's rotary row order and weight offsets, default chat templates, and the
pre-tokenizers (tokenizer.ggml.pre). Read by the importer and, inverted, by the GGUF exporter;
adding a family is a table entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from tokenizers import Regex, pre_tokenizers

from mlxft.errors import ModelError


def _getter(metadata: dict, prefix: str):
    def get(key, default=None):
        value = metadata.get(f"{prefix}.{key}", default)
        if value is None:
            raise ModelError(f"GGUF metadata lacks {prefix}.{key}")
        return value
    return get


def _f32(value: float) -> float:
    """GGUF stores float32: write 1e-05, not 9.999999747378752e-06."""
    return float(f"{value:.7g}")


def _llama_config(metadata: dict, prefix: str, model_type: str = "llama") -> dict:
    """Llama-shaped families (llama, mistral, qwen2, ...): mlx-lm's ModelArgs share these keys."""
    get = _getter(metadata, prefix)
    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        # GGUF stores float32: write 1e-05, not 9.999999747378752e-06.
        "rms_norm_eps": float(f'{get("attention.layer_norm_rms_epsilon"):.7g}'),
        "rope_theta": float(f'{get("rope.freq_base", 10000.0):.7g}'),
        "max_position_embeddings": get("context_length"),
    }
    head_dim = get("attention.key_length", hidden // heads)
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    return _with_rope_scaling(config, metadata, prefix)


def _with_rope_scaling(config: dict, metadata: dict, prefix: str) -> dict:
    """Add the GGUF's rope scaling to `config` (only linear scaling is supported)."""
    scaling = metadata.get(f"{prefix}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _getter(metadata, prefix)("rope.scaling.factor")}
    elif scaling != "none":
        raise ModelError(f"rope scaling {scaling!r} is not supported yet (only 'linear')")
    return config


def _gemma3_config(metadata: dict, prefix: str) -> dict:
    """mlx-lm's gemma3_text ModelArgs from gemma3 GGUF metadata.

    llama.cpp's converter leaves out what it hard-codes for gemma3; the same defaults are used
    here: local (sliding-window) rope base 10000, every 6th layer global, and attention scaled
    by head_dim**-0.5 (the 27B model, 62 layers, by (hidden/heads)**-0.5).
    """
    get = _getter(metadata, prefix)
    hidden, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
    head_dim = get("attention.key_length", 256)
    pattern = metadata.get(f"{prefix}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # newer converters: one bool per layer, True = sliding
        period = next((i + 1 for i, sliding in enumerate(pattern) if not sliding), len(pattern))
        if any(bool(s) != ((i + 1) % period != 0) for i, s in enumerate(pattern)):
            raise ModelError(f"sliding window layout {pattern} is not periodic; mlx-lm needs a period")
        pattern = period
    config = {
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": _f32(get("rope.freq_base_swa", 10_000.0)),
        "query_pre_attn_scalar": hidden // heads if layers == 62 else head_dim,
        "sliding_window": get("attention.sliding_window"),
        "sliding_window_pattern": pattern,
        "max_position_embeddings": get("context_length"),
        "rope_scaling": None,
    }
    return _with_rope_scaling(config, metadata, prefix)


@dataclass(frozen=True)
class Architecture:
    """What the importer needs to know about one ``general.architecture``."""

    metadata_prefix: str  # hyperparameters live under "<prefix>.<key>"
    tensor_names: dict[str, str]  # GGUF base name ({n} = block) -> mlx-lm module path
    rotary_permuted: dict[str, str]  # tensors llama.cpp row-permuted -> metadata key of their head count
    build_config: Callable[[dict, str], dict]
    # Constants llama.cpp added to tensors at conversion, undone here (gemma norms: +1).
    weight_offsets: dict[str, float] = field(default_factory=dict)
    # Used when the GGUF carries no tokenizer.chat_template (base models); its end-of-turn
    # token (looked up in the vocabulary) joins the eos ids so generation stops after a turn.
    default_chat_template: str | None = None
    end_of_turn: str | None = None


_LLAMA_TENSORS = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.{n}.attn_q": "model.layers.{n}.self_attn.q_proj",
    "blk.{n}.attn_k": "model.layers.{n}.self_attn.k_proj",
    "blk.{n}.attn_v": "model.layers.{n}.self_attn.v_proj",
    "blk.{n}.attn_output": "model.layers.{n}.self_attn.o_proj",
    "blk.{n}.ffn_gate": "model.layers.{n}.mlp.gate_proj",
    "blk.{n}.ffn_up": "model.layers.{n}.mlp.up_proj",
    "blk.{n}.ffn_down": "model.layers.{n}.mlp.down_proj",
    "blk.{n}.attn_norm": "model.layers.{n}.input_layernorm",
    "blk.{n}.ffn_norm": "model.layers.{n}.post_attention_layernorm",
}
_GEMMA3_TENSORS = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm",
    "blk.{n}.attn_q": "model.layers.{n}.self_attn.q_proj",
    "blk.{n}.attn_k": "model.layers.{n}.self_attn.k_proj",
    "blk.{n}.attn_v": "model.layers.{n}.self_attn.v_proj",
    "blk.{n}.attn_output": "model.layers.{n}.self_attn.o_proj",
    "blk.{n}.attn_q_norm": "model.layers.{n}.self_attn.q_norm",
    "blk.{n}.attn_k_norm": "model.layers.{n}.self_attn.k_norm",
    "blk.{n}.ffn_gate": "model.layers.{n}.mlp.gate_proj",
    "blk.{n}.ffn_up": "model.layers.{n}.mlp.up_proj",
    "blk.{n}.ffn_down": "model.layers.{n}.mlp.down_proj",
    "blk.{n}.attn_norm": "model.layers.{n}.input_layernorm",
    "blk.{n}.post_attention_norm": "model.layers.{n}.post_attention_layernorm",
    "blk.{n}.ffn_norm": "model.layers.{n}.pre_feedforward_layernorm",
    "blk.{n}.post_ffw_norm": "model.layers.{n}.post_feedforward_layernorm",
}
# Gemma's turn format; the system prompt (which Gemma has no role for) opens the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ ns.system + message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- set ns.system = '' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
ARCHITECTURES = {
    "llama": Architecture(
        metadata_prefix="llama",
        tensor_names=_LLAMA_TENSORS,
        rotary_permuted={"blk.{n}.attn_q": "attention.head_count",
                         "blk.{n}.attn_k": "attention.head_count_kv"},
        build_config=_llama_config,
    ),
    # llama.cpp keeps qwen2's q/k rows as they are (NEOX rope); biases come along by name.
    "qwen2": Architecture(
        metadata_prefix="qwen2",
        tensor_names=_LLAMA_TENSORS,
        rotary_permuted={},
        build_config=partial(_llama_config, model_type="qwen2"),
    ),
    "gemma3": Architecture(
        metadata_prefix="gemma3",
        tensor_names=_GEMMA3_TENSORS,
        rotary_permuted={},  # NEOX rope in llama.cpp: rows are not permuted
        build_config=_gemma3_config,
        # llama.cpp stores gemma's RMSNorm weights as 1 + w; mlx-lm's gemma3_text adds the 1 itself.
        weight_offsets={t: -1.0 for t in _GEMMA3_TENSORS if t.endswith("norm")},
        default_chat_template=GEMMA_CHAT_TEMPLATE,
        end_of_turn="<end_of_turn>",
    ),
}

_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# tokenizer.ggml.pre -> the HF pre-tokenizer that splits text the way llama.cpp does
PRE_TOKENIZERS = {
    "gpt-2": lambda: _GPT2_SPLIT,
    # llama.cpp splits every \p{N} alone before the GPT-2 regex; HF SmolLM2 ships the same.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]),
    "qwen2": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    # Llama 3: digits in runs of up to three (qwen2 splits every digit).
    "llama-bpe": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


