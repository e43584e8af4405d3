"""Import a llama.cpp GGUF file as an mlx-lm model folder.

    from mlxft.models.gguf_import import import_gguf
    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")

The folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) loads with stock ``mlx_lm.load``. Q4_0/Q4_1/Q8_0 weights stay
quantized as MLX affine triplets (group size 32) unless ``dequantize`` asks for dense ones.
Files with other types (K-quants Q4_K/Q6_K/..., Q5_0, IQ*, ...) are dequantized in numpy by
the ``gguf`` package; kept quantized, they are re-quantized to MLX's nearest bit width.
Per-architecture knowledge lives in gguf_families.ARCHITECTURES and tokenizer kinds in
``TOKENIZERS``; adding a family is a table entry.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

import mlx.core as mx

from mlxft.errors import ModelError
from mlxft.models.gguf import (
    DENSE_DTYPES, GROUP_SIZE, MALFORMED, MLX_NATIVE_TYPES, TensorInfo, malformed, mlx_bits, read_gguf_model, supported_types,
)
from mlxft.models.gguf_families import Architecture, ARCHITECTURES, PRE_TOKENIZERS

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


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
            bits = mlx_bits(info.type_name)
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
    with malformed(path, "metadata"):  # values of the wrong type or out of range: one message, not a traceback
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


