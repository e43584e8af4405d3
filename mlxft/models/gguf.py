"""Read llama.cpp GGUF files: the header, metadata and tensor table, checked before anything is
allocated (a hostile file's sizes and counts fail fast), and a summary of a file.

The importer (gguf_import.py) turns a file into an mlx-lm folder; per-family knowledge is in
gguf_families.py; the exporter (mlxft/export/) writes GGUF files.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

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


def mlx_bits(type_name: str) -> int:
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
    with malformed(Path(path), "metadata"):
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



# What interpreting a hostile header's values can raise besides ModelError (a list where a number
# belongs, a zero head count, an index past the vocabulary): the file is malformed, not mlxft.
MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError,
             RecursionError, struct.error, BufferError)


@contextmanager
def malformed(path: Path, part: str):
    try:
        yield
    except MALFORMED as e:
        raise ModelError(f"{path}: malformed GGUF {part} ({type(e).__name__}: {str(e)[:200]})") from None

