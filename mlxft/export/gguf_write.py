"""Write GGUF files llama.cpp and Ollama load: a whole model, or a LoRA adapter on its own.

    from mlxft.export.gguf_write import write_model_gguf, write_lora_gguf
    write_model_gguf(model, config, tokenizer_meta, "model.Q8_0.gguf", "q8_0")

The per-family knowledge is the importer's table (``mlxft.models.gguf_families.ARCHITECTURES``) read
backwards: mlx-lm names -> llama.cpp names, llama's q/k rows permuted back into
llama.cpp's rotary order, Gemma's +1 put back on every norm. Tensor data is encoded
with the ``gguf`` package (llama.cpp's own Python writer and quantizers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from mlxft.errors import ModelError
from mlxft.models.gguf_families import ARCHITECTURES

# mlx-lm model_type -> llama.cpp general.architecture (the families import-gguf reads back).
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
# --quant choices the gguf package encodes itself, with llama.cpp's file type numbers.
WRITABLE = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7),
            "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9)}
# Types only llama.cpp's own quantizer (llama-quantize) makes: importance-weighted K- and I-quants.
LLAMA_QUANTIZE_ONLY = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                       "iq2_xxs", "iq2_xs", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs")
_BLOCK = 32  # every type above packs rows in blocks of 32 weights
# The output matrix (or the embedding that doubles as it) in 4/5-bit files: llama-quantize gives it
# Q6_K, which the gguf package cannot write; Q8_0 is the nearest it can.
HEAD_TYPE_BELOW_8_BIT = "q8_0"


@dataclass(frozen=True)
class Family:
    """One family's export knowledge, derived from the import table."""

    arch: str  # general.architecture
    tensor_names: dict[str, str]  # mlx-lm module path ({n} = block) -> GGUF base name
    permuted: dict[str, str]  # GGUF base name -> metadata key of its head count (llama's q/k)
    offsets: dict[str, float]  # GGUF base name -> constant llama.cpp adds (gemma norms: +1)


def family_of(config: dict) -> Family:
    """The export family of an mlx-lm config.json; ModelError names the supported ones."""
    arch = MODEL_TYPES.get(config.get("model_type"))
    if arch is None:
        raise ModelError(f"GGUF export of model_type {config.get('model_type')!r} is not supported; "
                         f"supported: {', '.join(sorted(MODEL_TYPES))} (export --to mlx works for any model)")
    table = ARCHITECTURES[arch]
    names = {mlx: gguf for gguf, mlx in table.tensor_names.items()}
    return Family(arch, names, dict(table.rotary_permuted), {k: -v for k, v in table.weight_offsets.items()})


def permute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotary row order (per head: 2 halves) -> llama.cpp's (per head: interleaved pairs)."""
    return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's rotary row order back to HF's (the inverse of permute_rows)."""
    return rows.reshape(n_heads, rows.shape[0] // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_base_name(family: Family, module: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> 'blk.3.attn_q'; ModelError for a module llama.cpp has no tensor for."""
    match = re.fullmatch(r"(.*?)\.(\d+)\.(.*)", module)
    template, block = (f"{match[1]}.{{n}}.{match[3]}", match[2]) if match else (module, "")
    name = family.tensor_names.get(template)
    if name is None:
        raise ModelError(f"{module} has no llama.cpp tensor in the {family.arch} layout")
    return name.format(n=block)


def _template(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "blk.{n}.", name)


# ---------------------------------------------------------------- metadata


def architecture_metadata(config: dict, family: Family) -> dict:
    """llama.cpp's hyperparameter keys from an mlx-lm config (the inverse of import's build_config)."""
    arch = family.arch
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    meta = {
        f"{arch}.context_length": config.get("max_position_embeddings", 2048),
        f"{arch}.embedding_length": hidden,
        f"{arch}.block_count": config["num_hidden_layers"],
        f"{arch}.feed_forward_length": config["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": config.get("num_key_value_heads", heads),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
        f"{arch}.rope.freq_base": float(config.get("rope_theta", 10000.0 if arch != "gemma3" else 1_000_000.0)),
    }
    if arch == "gemma3":
        meta.update(_gemma3_metadata(config, head_dim))
    else:
        meta[f"{arch}.rope.dimension_count"] = head_dim
        if head_dim != hidden // heads:
            meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = head_dim
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind == "linear":
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
    elif kind not in (None, "default"):
        raise ModelError(f"rope scaling {kind!r} cannot be exported yet (only linear); use --to mlx")
    return meta


def _gemma3_metadata(config: dict, head_dim: int) -> dict:
    layers, hidden, heads = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    llama_cpp_scale = hidden // heads if layers == 62 else head_dim  # what llama.cpp hard-codes
    if config.get("query_pre_attn_scalar", llama_cpp_scale) != llama_cpp_scale:
        raise ModelError(f"query_pre_attn_scalar {config['query_pre_attn_scalar']} differs from the "
                         f"{llama_cpp_scale} llama.cpp assumes for a {layers}-layer gemma3; it cannot be exported")
    meta = {"gemma3.attention.key_length": head_dim, "gemma3.attention.value_length": head_dim,
            "gemma3.rope.freq_base_swa": float(config.get("rope_local_base_freq", 10000.0)),
            "gemma3.attention.sliding_window_pattern": int(config.get("sliding_window_pattern", 6))}
    if config.get("sliding_window"):
        meta["gemma3.attention.sliding_window"] = int(config["sliding_window"])
    if config.get("final_logit_softcapping"):
        meta["gemma3.final_logit_softcapping"] = float(config["final_logit_softcapping"])
    return meta


def _add_metadata(writer, metadata: dict) -> None:
    """Typed GGUF key/values: ids and counts uint32, flags bool, floats float32, lists typed by element."""
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        else:
            raise ModelError(f"GGUF metadata {key} has a value of type {type(value).__name__}")


# ---------------------------------------------------------------- tensors


def model_tensors(weights: dict[str, np.ndarray], family: Family, metadata: dict) -> dict[str, np.ndarray]:
    """mlx-lm weights (float32 numpy, dense) -> GGUF tensors in llama.cpp's names and layout."""
    out = {}
    for name, array in weights.items():
        module, _, param = name.rpartition(".")
        base = gguf_base_name(family, module)
        template = _template(base)
        if template in family.permuted:
            array = permute_rows(array, metadata[f"{family.arch}.{family.permuted[template]}"])
        if param == "weight" and template in family.offsets:
            array = array + np.float32(family.offsets[template])
        out[f"{base}.{param}"] = np.ascontiguousarray(array, dtype=np.float32)
    return out


def encode(array: np.ndarray, quant: str) -> tuple[np.ndarray, object, str]:
    """(data, raw GGML type or None, type name) of one tensor at --quant: 1-D tensors (norms, biases)
    stay F32 as in llama.cpp's converter; rows that are not whole blocks fall back to F16, as there."""
    type_name = WRITABLE[quant][0]
    if array.ndim == 1 or type_name == "F32":
        return array.astype(np.float32), None, "F32"
    if type_name == "F16" or (type_name != "BF16" and array.shape[-1] % _BLOCK):
        return array.astype(np.float16), None, "F16"
    qtype = gguf.GGMLQuantizationType[type_name]
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype, type_name


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, np.ndarray], quant: str,
               kind: str = "model", overrides: dict[str, str] | None = None) -> dict[str, int]:
    """One GGUF file (kind 'model' or 'adapter'); ``overrides`` gives some tensors another --quant.
    Returns {type name: tensor count}."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(kind)
    if kind == "model":
        writer.add_file_type(WRITABLE[quant][1])
        if quant not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_metadata(writer, metadata)
    counts: dict[str, int] = {}
    for name, array in tensors.items():
        data, qtype, type_name = encode(array, (overrides or {}).get(name, quant))
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[type_name] = counts.get(type_name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


def write_model_gguf(path: Path, weights: dict[str, np.ndarray], config: dict, tokenizer_meta: dict,
                     quant: str, general: dict | None = None) -> dict[str, int]:
    """The whole model (fused weights) as one GGUF file at --quant."""
    family = family_of(config)
    if family.arch == "gemma3" and "lm_head.weight" in weights:
        raise ModelError("a gemma3 model with an untied lm_head cannot be exported to GGUF yet")
    metadata = {**(general or {}), **architecture_metadata(config, family), **tokenizer_meta}
    metadata[f"{family.arch}.vocab_size"] = int(weights["model.embed_tokens.weight"].shape[0])
    tensors = model_tensors(weights, family, metadata)
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    overrides = {head: HEAD_TYPE_BELOW_8_BIT} if quant.startswith(("q4", "q5")) else {}
    return write_gguf(path, family.arch, metadata, tensors, quant, overrides=overrides)


# ---------------------------------------------------------------- LoRA adapters


def lora_tensors(adapter: dict[str, np.ndarray], config: dict) -> dict[str, np.ndarray]:
    """mlx-lm LoRA tensors -> llama.cpp's '<tensor>.weight.lora_a' (rank x in) and '.lora_b' (out x rank).

    mlx-lm computes y = W x + scale * (x A) B with A (in x rank), B (rank x out); llama.cpp
    computes W x + (alpha / rank) * B' A' x, so A' = A^T and B' = B^T, with llama's q/k rows of
    B permuted like the weight they add to (A's columns are the input, never permuted).
    """
    family = family_of(config)
    heads = {"attention.head_count": config["num_attention_heads"],
             "attention.head_count_kv": config.get("num_key_value_heads", config["num_attention_heads"])}
    out = {}
    for name, array in adapter.items():
        module, _, part = name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ModelError(f"adapter tensor {name} is not a LoRA A/B matrix (DoRA and full fine-tunes "
                             "have no llama.cpp adapter format; export the fused model instead)")
        base = gguf_base_name(family, module)
        matrix = np.ascontiguousarray(array.astype(np.float32).T)
        if part == "lora_b" and _template(base) in family.permuted:
            matrix = permute_rows(matrix, heads[family.permuted[_template(base)]])
        out[f"{base}.weight.{part}"] = matrix
    return out


def write_lora_gguf(path: Path, adapter: dict[str, np.ndarray], config: dict, scale: float, rank: int,
                    general: dict | None = None) -> dict[str, int]:
    """The LoRA adapter alone (float32) for llama.cpp --lora / Ollama ADAPTER; alpha = scale x rank."""
    family = family_of(config)
    metadata = {**(general or {}), "adapter.type": "lora", "adapter.lora.alpha": float(scale * rank)}
    return write_gguf(path, family.arch, metadata, lora_tensors(adapter, config), "f32", kind="adapter")
