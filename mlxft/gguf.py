"""Import a llama.cpp GGUF file as an mlx-lm model folder.

    from mlxft.gguf import import_gguf
    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")

The folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) loads with stock ``mlx_lm.load``. Q4_0/Q4_1/Q8_0 weights stay
quantized as MLX affine triplets (group size 32) unless ``dequantize`` asks for dense ones.
Per-architecture knowledge lives in ``ARCHITECTURES``; adding one is a table entry.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from mlxft.errors import ModelError

# ggml tensor type names by id (ggml.h), for messages; SUPPORTED_TYPES are the importable ones.
TENSOR_TYPES = dict(enumerate(
    "F32 F16 Q4_0 Q4_1 Q4_2 Q4_3 Q5_0 Q5_1 Q8_0 Q8_1 Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K IQ2_XXS IQ2_XS "
    "IQ3_XXS IQ1_S IQ4_NL IQ3_S IQ2_S IQ4_XS I8 I16 I32 I64 F64 IQ1_M BF16".split()))
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
GROUP_SIZE = 32  # every Q4_0/Q4_1/Q8_0 block covers 32 weights: MLX's group size
DENSE_DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16, "fp32": mx.float32}

# GGUF metadata value types -> struct codes (8 = string and 9 = array are handled apart).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table."""

    type_name: str
    shape: tuple[int, ...]  # MLX (row-major) order: GGUF stores dims reversed
    offset: int  # absolute byte offset of the data in the file


class _Reader:
    """Little-endian cursor over the GGUF header bytes."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values if len(values) > 1 else values[0]

    def string(self) -> str:
        size = self.unpack("Q")
        text = self.buf[self.pos:self.pos + size].decode("utf-8", errors="replace")
        self.pos += size
        return text

    def value(self, kind: int) -> Any:
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind, count = self.unpack("IQ")
            if item_kind in _SCALARS:  # one struct call: token-type arrays hold ~10^5 items
                return list(self.unpack(f"{count}{_SCALARS[item_kind]}")) if count else []
            return [self.value(item_kind) for _ in range(count)]
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
                metadata = {}
                for _ in range(n_kv):
                    key = reader.string()
                    metadata[key] = reader.value(reader.unpack("I"))
                raw = []
                for _ in range(n_tensors):
                    name, ndim = reader.string(), reader.unpack("I")
                    dims = [reader.unpack("Q") for _ in range(ndim)]
                    raw.append((name, reader.unpack("I"), tuple(reversed(dims)), reader.unpack("Q")))
            except (struct.error, ValueError, OverflowError) as e:
                raise ModelError(f"{path} is a truncated or corrupt GGUF file ({e})") from None
    alignment = metadata.get("general.alignment", 32)
    data_start = -(-reader.pos // alignment) * alignment  # the data section starts aligned
    tensors = {name: TensorInfo(TENSOR_TYPES.get(kind, f"type {kind}"), shape, data_start + offset)
               for name, kind, shape, offset in raw}
    return metadata, tensors


def gguf_metadata_summary(path: str | os.PathLike) -> dict[str, Any]:
    """A short description of a GGUF file (architecture, sizes, tensor types, tokenizer)."""
    metadata, tensors = read_gguf_header(path)
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


def _llama_config(metadata: dict, prefix: str) -> dict:
    def get(key, default=None):
        value = metadata.get(f"{prefix}.{key}", default)
        if value is None:
            raise ModelError(f"GGUF metadata lacks {prefix}.{key}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "model_type": "llama",
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
    scaling = metadata.get(f"{prefix}.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor")}
    elif scaling != "none":
        raise ModelError(f"rope scaling {scaling!r} is not supported yet (only 'linear')")
    return config


@dataclass(frozen=True)
class Architecture:
    """What the importer needs to know about one ``general.architecture``."""

    metadata_prefix: str  # hyperparameters live under "<prefix>.<key>"
    tensor_names: dict[str, str]  # GGUF base name ({n} = block) -> mlx-lm module path
    rotary_permuted: dict[str, str]  # tensors llama.cpp row-permuted -> metadata key of their head count
    build_config: Callable[[dict, str], dict]


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
ARCHITECTURES = {
    "llama": Architecture(
        metadata_prefix="llama",
        tensor_names=_LLAMA_TENSORS,
        rotary_permuted={"blk.{n}.attn_q": "attention.head_count",
                         "blk.{n}.attn_k": "attention.head_count_kv"},
        build_config=_llama_config,
    ),
}

_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# tokenizer.ggml.pre -> the HF pre-tokenizer that splits text the way llama.cpp does
# (llama3's "llama-bpe" would be a Split(Regex) + ByteLevel(use_regex=False) entry).
PRE_TOKENIZERS = {
    "gpt-2": lambda: _GPT2_SPLIT,
    # llama.cpp splits every \p{N} alone before the GPT-2 regex; HF SmolLM2 ships the same.
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]),
}


def _build_tokenizer(metadata: dict, path: Path) -> Tokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
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
        bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
        post.append(processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, metadata["tokenizer.ggml.bos_token_id"])]))
    tokenizer.post_processor = processors.Sequence(post) if len(post) > 1 else post[0]
    # Control tokens (<|im_end|>, ...) must match whole, never be split by BPE.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == _USER_DEFINED])
    return tokenizer


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
    for name, info in tensors.items():
        if info.type_name not in SUPPORTED_TYPES:
            raise ModelError(f"{path}: tensor {name} has type {info.type_name}, which cannot be "
                             f"imported; supported types: {', '.join(SUPPORTED_TYPES)}")
        if _template(name.rpartition(".")[0])[0] not in arch.tensor_names:
            raise ModelError(f"{path}: tensor {name} has no mlx-lm counterpart "
                             f"for architecture {arch.metadata_prefix!r}")


def _load_tensors(path: Path, tensors: dict[str, TensorInfo]) -> dict[str, mx.array]:
    """Tensors by GGUF name, quantized ones as MLX triplets (<base>.weight/.scales/.biases)."""
    try:
        arrays = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ModelError(f"{path}: mlx could not read the tensors ({e})") from None
    for name, info in tensors.items():
        if info.type_name == "BF16":  # mx.load widens BF16 through float16 (lossy): read the bits
            bits = np.fromfile(path, np.uint16, count=int(np.prod(info.shape)), offset=info.offset)
            arrays[name] = mx.array(bits).view(mx.bfloat16).reshape(info.shape)
    return arrays


def _convert_weights(arrays, arch, metadata, dequantize):
    """Rename to mlx-lm names, undo the rotary permutation, optionally dequantize.

    Returns the new weights and {module path: bits} of the modules left quantized.
    """
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
        if "scales" in parts:
            bits = parts["weight"].shape[-1] // parts["scales"].shape[-1]  # uint32 words per group
            if dequantize:
                # In float32: dequantizing in the scales' float16 would round q * scale.
                dense = mx.dequantize(parts["weight"], parts["scales"].astype(mx.float32),
                                      parts["biases"].astype(mx.float32),
                                      group_size=GROUP_SIZE, bits=bits)
                parts = {"weight": dense}
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
    ids = {k: metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "padding", "unknown")}
    # Chat models end a turn with eot (when llama.cpp records one) as well as eos.
    eos_ids = [i for i in dict.fromkeys([ids["eos"], ids["eot"]]) if i is not None]
    config.update(vocab_size=tensors["token_embd.weight"].shape[0], bos_token_id=ids["bos"],
                  tie_word_embeddings="output.weight" not in tensors,  # llama.cpp drops tied heads
                  eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None))
    tokens = metadata["tokenizer.ggml.tokens"]
    name = {k: tokens[i] if i is not None else None for k, i in ids.items()}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name["bos"],
        "eos_token": name["eos"], "pad_token": name["padding"] or name["eos"],
        "unk_token": name["unknown"], "model_max_length": config["max_position_embeddings"],
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "chat_template": metadata.get("tokenizer.chat_template"),
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
    metadata, tensors = read_gguf_header(path)
    arch = ARCHITECTURES.get(metadata.get("general.architecture"))
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
        weights, bits_of = _convert_weights(_load_tensors(path, tensors), arch, metadata, dequantize)
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
        raise
    return out_dir
