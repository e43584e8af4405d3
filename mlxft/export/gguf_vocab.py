"""The tokenizer part of an exported GGUF: vocabulary, merges or scores, special tokens, chat template.

A base that came from a GGUF (the bundled models, a .gguf file) gives its own tokenizer
keys back verbatim: the vocabulary llama.cpp already read is the one it gets again.
A Hugging Face folder's byte-level BPE ``tokenizer.json`` is written as llama.cpp's
'gpt2' tokenizer, its pre-tokenizer named by comparing it with the ones import-gguf
knows. Either way the chat template is the one the run was TRAINED with.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models

from mlxft.errors import ModelError
from mlxft.models.gguf_families import PRE_TOKENIZERS
from mlxft.models.gguf import read_gguf_model

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values
_IGNORED = ("trim_offsets",)  # offsets only: no effect on the ids


def tokenizer_metadata(base_folder: Path, source_gguf: Path | None, chat_template: str | None) -> dict:
    """GGUF ``tokenizer.*`` keys for the run's base, with the training chat template."""
    if source_gguf is not None:
        meta = {k: v for k, v in read_gguf_model(source_gguf)[0].items() if k.startswith("tokenizer.")}
    else:
        meta = hf_tokenizer_metadata(Path(base_folder))
    meta.pop("tokenizer.chat_template", None)
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta


def _normalized(node):
    if isinstance(node, dict):
        return {k: _normalized(v) for k, v in node.items() if k not in _IGNORED}
    if isinstance(node, list):
        return [_normalized(v) for v in node]
    return node


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's tokenizer.ggml.pre for a tokenizer.json pre-tokenizer (one import-gguf reads back)."""
    wanted = _normalized(pre_tokenizer)
    for name, build in PRE_TOKENIZERS.items():
        probe = Tokenizer(models.BPE())
        probe.pre_tokenizer = build()
        if _normalized(json.loads(probe.to_str())["pre_tokenizer"]) == wanted:
            return name
    raise ModelError(f"the base's pre-tokenizer is not one llama.cpp names that mlxft knows "
                     f"({', '.join(PRE_TOKENIZERS)}): {json.dumps(pre_tokenizer)[:200]}")


def _is_byte_level(spec: dict) -> bool:
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return '"ByteLevel"' in text


def hf_tokenizer_metadata(folder: Path) -> dict:
    """llama.cpp 'gpt2' tokenizer keys from a Hugging Face byte-level BPE tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{folder} has no tokenizer.json; GGUF export needs one (or a base imported from a GGUF)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(spec):
        raise ModelError(f"{path}: only byte-level BPE tokenizers can be written from a Hugging Face folder "
                         f"(this one is {model.get('type')}); export from a base imported from a GGUF instead")
    vocab = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, token in added.items():
        vocab[token["content"]] = token_id
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]  # ids no token uses (padding rows), as llama.cpp names them
    for text, token_id in vocab.items():
        tokens[token_id] = text
    types = [_NORMAL] * size
    for token_id, token in added.items():
        types[token_id] = _CONTROL if token.get("special") else _USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(spec.get("pre_tokenizer")),
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    meta.update(_special_ids(folder, vocab, spec.get("post_processor")))
    return meta


def _adds_bos(post_processor: dict | None, bos: str | None) -> bool:
    """Whether the post-processor puts BOS first (Llama 3's does; its tokenizer_config may not say)."""
    if not post_processor or not bos:
        return False
    if post_processor.get("type") == "TemplateProcessing":
        return post_processor["single"][:1] == [{"SpecialToken": {"id": bos, "type_id": 0}}]
    return any(_adds_bos(p, bos) for p in post_processor.get("processors", []))


def _special_ids(folder: Path, vocab: dict[str, int], post_processor: dict | None = None) -> dict:
    """bos/eos/unk/pad ids and add_bos_token from tokenizer_config.json (eos: config.json's first id too)."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    model_cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    meta = {}
    for key, gguf_key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        token = cfg.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            meta[f"tokenizer.ggml.{gguf_key}_token_id"] = vocab[token]
    eos = model_cfg.get("eos_token_id")
    extra = [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
    if "tokenizer.ggml.eos_token_id" not in meta and extra:
        meta["tokenizer.ggml.eos_token_id"] = int(extra[0])
    others = [i for i in extra if i != meta.get("tokenizer.ggml.eos_token_id")]
    if others:  # a second end id (Llama 3's <|eot_id|>): llama.cpp's end-of-turn token
        meta["tokenizer.ggml.eot_token_id"] = int(others[0])
    bos = cfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    meta["tokenizer.ggml.add_bos_token"] = bool(cfg["add_bos_token"] if "add_bos_token" in cfg
                                                else _adds_bos(post_processor, bos))
    return meta
