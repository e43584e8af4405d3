"""Import a llama.cpp GGUF file as an mlx-lm model folder.

    from mlxft.models.gguf import import_gguf
    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")

The folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) loads with stock ``mlx_lm.load``. Q4_0/Q4_1/Q8_0 weights stay
quantized as MLX affine triplets (group size 32) unless ``dequantize`` asks for dense ones.
Files with other types (K-quants Q4_K/Q6_K/..., Q5_0, IQ*, ...) are dequantized in numpy by
the ``gguf`` package; kept quantized, they are re-quantized to MLX's nearest bit width.
Per-architecture knowledge lives in ``ARCHITECTURES`` (names, config keys, fixes such as
gemma's norm offset) and tokenizer kinds in ``TOKENIZERS``; adding a family is a table entry.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import shutil
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import mlx.core as mx

from mlxft.errors import ModelError

# ggml tensor type names by id (ggml.h), for messages; supported_types() lists the importable ones.
TENSOR_TYPES = dict(enumerate(
    "F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS "
    "IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16".split()))
MLX_NATIVE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")  # what mx.load reads
GROUP_SIZE = 32  # every Q4_0/Q4_1/Q8_0 block covers 32 weights: MLX's group size
MLX_BITS = (2, 3, 4, 5, 6, 8)  # the widths MLX's affine quantization offers
DENSE_DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16, "fp32": mx.float32}

# GGUF metadata value types -> struct codes (8 = string and 9 = array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


def _type_name(kind: int) -> str:
    if kind in TENSOR_TYPES:
        return TENSOR_TYPES[kind]

    try:
        return gguf.GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


_SUPPORTED: tuple[str, ...] | None = None


def supported_types() -> tuple[str, ...]:
    """Tensor types the importer reads: mx.load's own, plus all the ``gguf`` package dequantizes."""
    global _SUPPORTED
    if _SUPPORTED is None:

        names = list(MLX_NATIVE_TYPES)
        for qtype, (block, size) in gguf.GGML_QUANT_SIZES.items():
            if qtype.name in names:
                continue
            try:  # one zero block: cheap, and exactly what the importer will call
                gguf.quants.dequantize(np.zeros((1, size), np.uint8), qtype)
            except (NotImplementedError, ValueError, TypeError):
                continue
            names.append(qtype.name)
        _SUPPORTED = tuple(names)
    return _SUPPORTED


def _mlx_bits(type_name: str) -> int:
    """The MLX width a re-quantized tensor of this GGUF type gets: its bits per weight, rounded down
    to one MLX offers (Q4_K 4.5 bpw -> 4, Q5_0 -> 5, Q6_K 6.56 -> 6, Q8_0 -> 8, IQ2_XXS -> 2)."""

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    bpw = int(size * 8 / block)
    return max([b for b in MLX_BITS if b <= bpw] or [MLX_BITS[0]])


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table."""

    type_name: str
    shape: tuple[int, ...]  # MLX (row-major) order: GGUF stores dims reversed
    offset: int  # absolute byte offset of the data in the file
    file: Path | None = None  # the file (or gguf-split shard) that holds it
    # mx.load (mlx 0.32) crashes the process on float64 metadata and refuses nested arrays: such a
    # file is read through the gguf package instead.
    mlx_loadable: bool = True


class _Reader:
    """Little-endian cursor over the GGUF header bytes.

    Every size and count the file states is checked against the bytes left before anything is
    read or allocated, so a hostile header fails at once instead of claiming gigabytes."""

    MAX_DEPTH = 4  # arrays of arrays: real files nest one level

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos
        self.kinds: set[int] = set()  # value types seen (array items and nesting included)

    def left(self) -> int:
        return len(self.buf) - self.pos

    def claim(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse `count` items of at least `item_bytes` each when the file cannot hold them."""
        if count * item_bytes > self.left():
            raise ValueError(f"{what} claims {count} items at byte {self.pos}, more than the {self.left()} bytes left")

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        size = self.unpack("Q")
        self.claim(size, 1, "a string")
        text = self.buf[self.pos:self.pos + size].decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int, depth: int = 0) -> Any:
        self.kinds.add(kind + 100 * depth if kind == 9 else kind)  # an array inside an array shows as 109
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind, count = self.unpack("IQ")
            if depth >= self.MAX_DEPTH:
                raise ValueError(f"arrays nested more than {self.MAX_DEPTH} deep")
            if item_kind in _SCALARS:  # one struct call: token-type arrays hold ~10^5 items
                self.kinds.add(item_kind)
                self.claim(count, struct.calcsize(_SCALARS[item_kind]), "an array")
                fmt = f"<{count}{_SCALARS[item_kind]}"
                items = list(struct.unpack_from(fmt, self.buf, self.pos))  # a tuple even for one item
                self.pos += struct.calcsize(fmt)
                return items
            if item_kind not in (8, 9):
                raise ValueError(f"unknown metadata value type {item_kind}")
            self.claim(count, 8 if item_kind == 8 else 12, "an array")
            return [self.value(item_kind, depth + 1) for _ in range(count)]
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        raise ValueError(f"unknown metadata value type {kind}")


def read_gguf_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Read a GGUF file's metadata and tensor table without loading any tensor data.

    Raises ModelError when the file is missing, not a GGUF, or its header is corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            reader = _Reader(buf, pos=4)
            try:
                version, n_tensors, n_kv = reader.unpack("IQQ")
                if version < 2:
                    raise ModelError(f"{path}: GGUF version {version} is too old; re-convert it")
                reader.claim(n_kv, 13, "the metadata table")  # a key (8 + its bytes), a type (4), a value (>= 1)
                metadata = {}
                for _ in range(n_kv):
                    key = reader.string()
                    metadata[key] = reader.value(reader.unpack("I"))
                reader.claim(n_tensors, 24, "the tensor table")  # name (8+), ndim (4), type (4), offset (8)
                raw = []
                for _ in range(n_tensors):
                    name, ndim = reader.string(), reader.unpack("I")
                    if not 1 <= ndim <= 4:  # GGML_MAX_DIMS
                        raise ValueError(f"tensor {name!r} has {ndim} dimensions (1 to 4 allowed)")
                    dims = [reader.unpack("Q") for _ in range(ndim)]
                    raw.append((name, reader.unpack("I"), tuple(reversed(dims)), reader.unpack("Q")))
            except (struct.error, ValueError, OverflowError, RecursionError) as e:
                raise ModelError(f"{path} is a truncated or corrupt GGUF file ({e})") from None
            file_size = len(buf)
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ModelError(f"{path}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-reader.pos // alignment) * alignment  # the data section starts aligned
    loadable = 12 not in reader.kinds and not any(k >= 100 for k in reader.kinds)  # no float64, no nesting
    tensors = {name: TensorInfo(_type_name(kind), shape, data_start + offset, path, loadable)
               for name, kind, shape, offset in raw}
    for name, info in tensors.items():
        if 0 in info.shape:
            raise ModelError(f"{path} is corrupt: tensor {name} has shape {info.shape} (no elements)")
        size = _tensor_bytes(info)
        if size is not None and info.offset + size > file_size:
            raise ModelError(f"{path} is truncated or corrupt: tensor {name} ({info.type_name}, shape {info.shape}) "
                             f"needs bytes {info.offset}..{info.offset + size}, the file has {file_size}")
    return metadata, tensors


def _tensor_bytes(info: TensorInfo) -> int | None:
    """Bytes a tensor's data takes (None for a type this reader does not know; refused later)."""

    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[info.type_name]]
    except KeyError:
        return None
    count = math.prod(info.shape)
    return -(-count // block) * size


_SHARD_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")  # llama.cpp's gguf-split naming


def read_gguf_model(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    """Metadata and tensor table of a GGUF model: one file, or all shards of a gguf-split set.

    A split model is named by its first shard (``name-00001-of-0000N.gguf``); the others are
    read from beside it. Raises ModelError for another shard, a missing one or a short table.
    """
    path = Path(path)
    metadata, tensors = read_gguf_header(path)
    count = metadata.get("split.count", 1) or 1
    if isinstance(count, bool) or not isinstance(count, int) or count > 9999:  # gguf-split names hold 5 digits
        raise ModelError(f"{path}: split.count {count!r} is not a shard count")
    if count <= 1:
        return metadata, tensors
    match = _SHARD_NAME.fullmatch(path.name)
    number = metadata.get("split.no", 0)
    if not isinstance(number, int):
        raise ModelError(f"{path}: split.no {number!r} is not a shard number")
    if not match or number != 0:
        raise ModelError(f"{path} is shard {number + 1} of {count} of a split GGUF; "
                         f"pass the first shard (...-00001-of-{count:05d}.gguf)")
    for number in range(2, count + 1):
        shard = path.with_name(f"{match[1]}-{number:05d}-of-{count:05d}.gguf")
        if not shard.is_file():
            raise ModelError(f"{path}: shard {shard.name} of this split GGUF is missing")
        tensors.update(read_gguf_header(shard)[1])
    expected = metadata.get("split.tensors.count")
    if expected is not None and expected != len(tensors):
        raise ModelError(f"{path}: the {count} shards hold {len(tensors)} tensors, the header says {expected}")
    return metadata, tensors


def gguf_metadata_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A short description of a GGUF file (architecture, sizes, tensor types, tokenizer)."""
    metadata, tensors = read_gguf_model(path)
    with _malformed(Path(path), "metadata"):
        return _summary(metadata, tensors)


def _summary(metadata: dict, tensors: dict) -> dict[str, Any]:
    arch = metadata.get("general.architecture")
    hyper = {k: metadata.get(f"{arch}.{key}") for k, key in [
        ("layers", "block_count"), ("hidden_size", "embedding_length"),
        ("attention_heads", "attention.head_count"), ("kv_heads", "attention.head_count_kv"),
        ("context_length", "context_length")]}
    return {"name": metadata.get("general.name"), "architecture": arch, **hyper,
            "vocab_size": len(metadata.get("tokenizer.ggml.tokens", [])),
            "tokenizer": metadata.get("tokenizer.ggml.model"),
            "has_chat_template": "tokenizer.chat_template" in metadata,
            "tensor_types": dict(Counter(t.type_name for t in tensors.values())),
            "parameters": sum(int(np.prod(t.shape)) for t in tensors.values())}


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


def _add_vocab_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int]) -> None:
    # Control tokens (<|im_end|>, <end_of_turn>, ...) must match whole, never be split;
    # user-defined ones (gemma's runs of newlines or spaces) match whole on the raw text too.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == _USER_DEFINED])


def _bos_processor(metadata: dict):
    tokens = metadata["tokenizer.ggml.tokens"]
    bos_id = metadata["tokenizer.ggml.bos_token_id"]
    bos = tokens[bos_id]
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, bos_id)])


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE / llama.cpp's SPM tokenizer on this vocabulary.

    SPM repeatedly joins the adjacent pair whose joined piece scores highest; as merges that is
    every split of every normal piece into two vocabulary pieces, ranked by the joined piece's score.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, score, kind in zip(tokens, scores, types):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[piece], vocab[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_spm_tokenizer(metadata: dict, path: Path) -> Tokenizer:
    """SentencePiece-style ('llama') vocabulary: pieces with scores, ▁ for spaces, byte fallback."""
    tokens = metadata["tokenizer.ggml.tokens"]
    scores = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise ModelError(f"{path}: SentencePiece vocabulary without tokenizer.ggml.scores")
    types = metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=spm_merges(tokens, scores, types),
                       unk_token=tokens[unk_id] if unk_id is not None else None,
                       byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        decode.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(decode)
    if metadata.get("tokenizer.ggml.add_bos_token", False):
        tokenizer.post_processor = _bos_processor(metadata)
    _add_vocab_tokens(tokenizer, tokens, types)
    return tokenizer


def _build_tokenizer(metadata: dict, path: Path) -> Tokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    if kind not in TOKENIZERS:
        raise ModelError(f"{path}: tokenizer model {kind!r} is not supported; supported: {sorted(TOKENIZERS)}")
    try:
        return TOKENIZERS[kind](metadata, path)
    except ModelError:
        raise
    except Exception as e:  # the tokenizers library raises plain Exception for a vocabulary it cannot build
        raise ModelError(f"{path}: the GGUF's {kind} vocabulary does not make a tokenizer ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None


def _build_bpe_tokenizer(metadata: dict, path: Path) -> Tokenizer:
    """Byte-level BPE ('gpt2'): vocabulary + merges + the pre-tokenizer llama.cpp names."""
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ModelError(f"{path}: pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}")
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    if metadata.get("tokenizer.ggml.add_bos_token", False):
        post.append(_bos_processor(metadata))
    tokenizer.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    _add_vocab_tokens(tokenizer, tokens, types)
    return tokenizer


# tokenizer.ggml.model -> builder of an HF tokenizers.Tokenizer
TOKENIZERS = {"gpt2": _build_bpe_tokenizer, "llama": _build_spm_tokenizer}


def _unpermute_rows(a: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's rotary row order: per head it stores rows as (dim/2, 2), HF as (2, dim/2)."""
    return a.reshape(n_heads, a.shape[0] // n_heads // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _template(base: str) -> tuple[str, str]:
    """'blk.7.attn_q' -> ('blk.{n}.attn_q', '7'); globals map to themselves."""
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", base)
    return (f"blk.{{n}}.{match[2]}", match[1]) if match else (base, "")


def _check_tensors(path: Path, tensors: dict[str, TensorInfo], arch: Architecture) -> None:
    """Fail before any heavy work on a tensor we cannot read or place."""
    if "token_embd.weight" not in tensors:
        raise ModelError(f"{path}: no token_embd.weight tensor")
    supported = supported_types()
    for name, info in tensors.items():
        if info.type_name not in supported:
            raise ModelError(f"{path}: tensor {name} has type {info.type_name}, which cannot be "
                             f"imported; supported types: {', '.join(supported)}")
        if _template(name.rpartition(".")[0])[0] not in arch.tensor_names:
            raise ModelError(f"{path}: tensor {name} has no mlx-lm counterpart "
                             f"for architecture {arch.metadata_prefix!r}")


def _load_tensors(path: Path, tensors: dict[str, TensorInfo]) -> dict[str, mx.array]:
    """Tensors by GGUF name, quantized ones as MLX triplets (<base>.weight/.scales/.biases).

    A file with any type mx.load cannot read is read whole through the ``gguf`` package:
    every tensor comes back dense (float32 for quantized types).
    """
    files = {info.file or path: {} for info in tensors.values()}
    for name, info in tensors.items():
        files[info.file or path][name] = info
    arrays = {}
    for file, part in files.items():  # one file, or each shard of a split model
        if any(info.type_name not in MLX_NATIVE_TYPES or not info.mlx_loadable for info in part.values()):
            arrays.update(_load_tensors_numpy(file, part))
            continue
        try:
            arrays.update(mx.load(str(file)))
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{file}: mlx could not read the tensors ({e})") from None
        for name, info in part.items():
            if info.type_name == "BF16":  # mx.load widens BF16 through float16 (lossy): read the bits
                bits = np.fromfile(file, np.uint16, count=int(np.prod(info.shape)), offset=info.offset)
                arrays[name] = mx.array(bits).view(mx.bfloat16).reshape(info.shape)
    return arrays


def _load_tensors_numpy(path: Path, tensors: dict[str, TensorInfo]) -> dict[str, mx.array]:
    arrays = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name, info in tensors.items():
            qtype = gguf.GGMLQuantizationType[info.type_name]
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            count = int(np.prod(info.shape))
            if info.shape[-1] % block:
                raise ModelError(f"{path}: tensor {name} rows ({info.shape[-1]}) are not whole "
                                 f"{info.type_name} blocks of {block}")
            nbytes = count // block * size
            if info.offset + nbytes > len(buf):
                raise ModelError(f"{path} is truncated: tensor {name} runs past the end of the file")
            raw = np.frombuffer(buf, np.uint8, count=nbytes, offset=info.offset)
            rows = raw.reshape(-1, info.shape[-1] // block * size)
            if info.type_name == "BF16":  # keep the bits; float32 would double the size
                array = mx.array(rows.view(np.uint16)).view(mx.bfloat16)
            elif info.type_name in ("F32", "F16"):
                array = mx.array(rows.view(np.float32 if info.type_name == "F32" else np.float16))
            else:
                array = mx.array(gguf.quants.dequantize(rows, qtype))
            arrays[name] = array.reshape(info.shape)
            del raw, rows
    return arrays


def _convert_weights(arrays, arch, metadata, dequantize, tensors=None):
    """Rename to mlx-lm names, undo the rotary permutation, optionally dequantize.

    Returns the new weights and {module path: bits} of the modules left quantized.
    Dense tensors that were quantized in the file (read through the ``gguf`` package) are
    re-quantized to MLX's nearest width unless ``dequantize`` is set.
    """
    tensors = tensors or {}
    weights, bits_of = {}, {}
    groups: dict[str, dict[str, mx.array]] = {}  # 'blk.0.attn_q' -> {'weight': .., 'scales': ..}
    for name, array in arrays.items():
        base, _, param = name.rpartition(".")
        groups.setdefault(base, {})[param] = array
    for base, parts in sorted(groups.items()):
        template, block = _template(base)
        target = arch.tensor_names[template].format(n=block)
        if template in arch.rotary_permuted:
            heads = metadata[f"{arch.metadata_prefix}.{arch.rotary_permuted[template]}"]
            # The permutation moves output rows, so it applies alike to weight, scales and biases.
            parts = {k: _unpermute_rows(a, heads) for k, a in parts.items()}
        offset = arch.weight_offsets.get(template)
        if offset is not None:
            if "scales" in parts:
                raise ModelError(f"{base} is quantized; the offset llama.cpp added to it cannot be undone")
            parts = {k: (a.astype(mx.float32) + offset).astype(a.dtype) if k == "weight" else a
                     for k, a in parts.items()}
        info = tensors.get(f"{base}.weight")
        if (not dequantize and "scales" not in parts and info is not None
                and info.type_name not in ("F32", "F16", "BF16")):
            bits = _mlx_bits(info.type_name)
            w, scales, biases = mx.quantize(parts["weight"], group_size=GROUP_SIZE, bits=bits)
            parts = {**parts, "weight": w, "scales": scales.astype(mx.float16),
                     "biases": biases.astype(mx.float16)}
        if "scales" in parts:
            bits = parts["weight"].shape[-1] // parts["scales"].shape[-1]  # uint32 words per group
            if dequantize:
                # In float32: dequantizing in the scales' float16 would round q * scale.
                dense = mx.dequantize(parts["weight"], parts["scales"].astype(mx.float32),
                                      parts["biases"].astype(mx.float32),
                                      group_size=GROUP_SIZE, bits=bits)
                parts = {**{k: a for k, a in parts.items() if k not in ("weight", "scales", "biases")},
                         "weight": dense}  # keeps a linear layer's own "bias"
            else:
                bits_of[target] = bits
        if dequantize:
            parts = {k: a.astype(DENSE_DTYPES[dequantize]) for k, a in parts.items()}
        weights.update({f"{target}.{k}": a for k, a in parts.items()})
    return weights, bits_of


def _quantization_block(bits_of: dict[str, int]) -> dict:
    """mlx-lm's config format: the commonest bits as default, per-module overrides for the rest."""
    default = Counter(bits_of.values()).most_common(1)[0][0]
    block = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, bits in sorted(bits_of.items()):
        if bits != default:
            block[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return block


def _hf_configs(path: Path, metadata: dict, tensors: dict, arch: Architecture) -> dict[str, dict]:
    """config.json, tokenizer_config.json and generation_config.json contents (unquantized)."""
    try:
        config = arch.build_config(metadata, arch.metadata_prefix)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from None
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "max_position_embeddings")
    for key in (k for k in sizes if k in config):  # a float or zero here would reach reshapes and divisions
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"{path}: the GGUF metadata gives {key}={value!r}; expected a positive integer")
    ids = {k: metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "padding", "unknown")}
    tokens = metadata["tokenizer.ggml.tokens"]
    chat_template = metadata.get("tokenizer.chat_template")
    if chat_template is None and arch.default_chat_template and arch.end_of_turn in tokens:
        # A base model's GGUF has no template; its family's turn format is the one it knows.
        chat_template = arch.default_chat_template
    if ids["eot"] is None and chat_template and arch.end_of_turn and arch.end_of_turn in chat_template:
        ids["eot"] = tokens.index(arch.end_of_turn)
    # Chat models end a turn with eot (when llama.cpp records one) as well as eos.
    eos_ids = [i for i in dict.fromkeys([ids["eos"], ids["eot"]]) if i is not None]
    config.update(vocab_size=tensors["token_embd.weight"].shape[0], bos_token_id=ids["bos"],
                  tie_word_embeddings="output.weight" not in tensors,  # llama.cpp drops tied heads
                  eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None))
    name = {k: tokens[i] if i is not None else None for k, i in ids.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name["bos"],
        "eos_token": name["eos"], "pad_token": name["padding"] or name["eos"],
        "unk_token": name["unknown"], "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": chat_template,
    }
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    generation_config = {"bos_token_id": ids["bos"], "eos_token_id": config["eos_token_id"]}
    return {"config.json": config, "tokenizer_config.json": tokenizer_config,
            "generation_config.json": generation_config}


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                dequantize: str | None = None) -> Path:
    """Convert a GGUF file into an mlx-lm model folder at ``out_dir`` and return its path.

    ``dequantize`` ("fp16", "bf16" or "fp32") writes dense weights of that dtype; by default
    Q4_0/Q4_1/Q8_0 tensors stay quantized. The folder appears complete or not at all.
    Raises ModelError for a missing or malformed file, an unsupported architecture,
    tensor type or tokenizer, or a non-empty ``out_dir``.
    """
    path, out_dir = Path(gguf_path), Path(out_dir)
    if dequantize is not None and dequantize not in DENSE_DTYPES:
        raise ModelError(f"dequantize={dequantize!r} is not one of {sorted(DENSE_DTYPES)}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelError(f"{out_dir} already exists and is not empty; pick a new folder")
    metadata, tensors = read_gguf_model(path)
    with _malformed(path, "metadata"):  # values of the wrong type or out of range: one message, not a traceback
        arch = ARCHITECTURES.get(str(metadata.get("general.architecture")))
        if arch is None:
            raise ModelError(f"{path}: architecture {metadata.get('general.architecture')!r} is not "
                             f"supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        _check_tensors(path, tensors, arch)  # validate everything cheap before loading weights
        configs = _hf_configs(path, metadata, tensors, arch)
        tokenizer = _build_tokenizer(metadata, path)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem (atomic).
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed run that had our pid
    tmp.mkdir()
    try:
        weights, bits_of = _convert_weights(_load_tensors(path, tensors), arch, metadata, dequantize, tensors)
        if bits_of:
            configs["config.json"]["quantization"] = _quantization_block(bits_of)
            configs["config.json"]["quantization_config"] = configs["config.json"]["quantization"]
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for file, content in configs.items():
            (tmp / file).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory everywhere
        tmp.rename(out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # disk full, permissions: a user-fixable problem, not a bug
            raise ModelError(f"{path}: could not write {out_dir} ({e})") from e
        if isinstance(e, (*MALFORMED, RuntimeError)):  # tensors that disagree with the metadata (mlx: RuntimeError)
            raise ModelError(f"{path}: malformed GGUF tensors ({type(e).__name__}: {e})") from None
        raise
    return out_dir


# What interpreting a hostile header's values can raise besides ModelError (a list where a number
# belongs, a zero head count, an index past the vocabulary): the file is malformed, not mlxft.
MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
             RecursionError, struct.error, BufferError)


@contextmanager
def _malformed(path: Path, part: str):
    try:
        yield
    except MALFORMED as e:
        raise ModelError(f"{path}: malformed GGUF {part} ({type(e).__name__}: {str(e)[:200]})") from None
