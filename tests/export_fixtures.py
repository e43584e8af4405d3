"""Tiny runs on three families for the export tests: llama and qwen2 from Hugging Face folders,
gemma3 from a GGUF (as the bundled models are), each with a strong random LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path

import mlxft  # noqa: F401
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from conftest import CHATML, SYSTEM, make_tiny_llama, write_tokenizer
from lora_fixtures import make_adapter_run

ALL_LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def make_tiny_qwen2(out: Path) -> Path:
    """A random 2-layer qwen2 (biased q/k/v, untied head, random norms) with the conftest tokenizer."""
    from mlx_lm.models import qwen2

    out.mkdir(parents=True)
    vocab = write_tokenizer(out, CHATML)
    config = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "vocab_size": vocab,
              "rope_theta": 1e6, "tie_word_embeddings": False, "max_position_embeddings": 256,
              "eos_token_id": vocab - 1}
    mx.random.seed(5)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    for k, v in weights.items():
        if "norm" in k or k.endswith("bias"):  # ones and zeros would hide a swapped or dropped tensor
            weights[k] = mx.random.uniform(0.5, 1.5, v.shape) if "norm" in k else mx.random.normal(v.shape) * 0.5
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


def tiny_run(root: Path, family: str, data_dir: Path) -> Path:
    """A run folder on a tiny base of `family` (llama, llama3, qwen2, gemma3) with LoRA on every linear layer."""
    run = _tiny_run(root, family, data_dir)
    path = run / "adapters" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_parameters"]["scale"] = 2.0  # strong enough to change answers, not so strong that fp16 rounds it away
    path.write_text(json.dumps(config))
    return run


def _tiny_run(root: Path, family: str, data_dir: Path) -> Path:
    if family == "gemma3":
        from gguf_fixtures import write_tiny_gemma3

        from mlxft.models.gguf_families import GEMMA_CHAT_TEMPLATE

        from mlxft.models.gguf_import import import_gguf

        gguf_path = root / "tiny-gemma3.gguf"
        root.mkdir(parents=True, exist_ok=True)
        write_tiny_gemma3(gguf_path)
        folder = import_gguf(gguf_path, root / "gemma3-folder", dequantize="fp32")
        run = make_adapter_run(root / "run", folder, seed=4, system_prompt=SYSTEM, chat_template=GEMMA_CHAT_TEMPLATE,
                               keys=ALL_LINEAR, data_dir=data_dir)
        config = json.loads((run / "config.json").read_text())
        config["recipe"]["model"]["source"] = str(gguf_path)  # trained on the GGUF, like builtin: models
        (run / "config.json").write_text(json.dumps(config))
        return run
    if family == "llama3":
        base = make_tiny_llama3(root / "tiny-llama3")
        return make_adapter_run(root / "run", base, seed=4, system_prompt=SYSTEM, chat_template=LLAMA3_TEMPLATE,
                                keys=ALL_LINEAR, data_dir=data_dir)
    base = make_tiny_llama(root / "tiny-llama") if family == "llama" else make_tiny_qwen2(root / "tiny-qwen2")
    return make_adapter_run(root / "run", base, seed=4, system_prompt=SYSTEM, keys=ALL_LINEAR, data_dir=data_dir)


def fused_reference(run: Path):
    """(model, tokenizer) of the run's base + adapter fused in MLX, as the run's base loads on this backend."""
    from mlx_lm.tuner.utils import load_adapters

    from mlxft.models.fuse import fuse_layers
    from mlxft.models.load import load_run_base
    from mlxft.runs.run import Run

    base = load_run_base(Run.open(run))  # with the run's chat template
    load_adapters(base.model, str(run / "adapters"))
    fuse_layers(base.model)
    return base.model, base.tokenizer


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                   " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def make_tiny_llama3(out: Path) -> Path:
    """A random 2-layer llama with a Llama 3 style tokenizer: llama-bpe pre-tokenizer, BOS from the
    post-processor, header/eot specials, two end ids in config.json."""
    from mlx_lm.models import llama
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    from mlxft.models.gguf_families import PRE_TOKENIZERS

    out.mkdir(parents=True)
    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in [("a", "l"), ("e", "t"), ("Ġ", "t"), ("b", "et")]:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "l"), ("e", "t"), ("Ġ", "t"), ("b", "et")]))
    tok.pre_tokenizer = PRE_TOKENIZERS["llama-bpe"]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(LLAMA3_SPECIALS)
    bos = len(vocab)
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE, "model_max_length": 2048}))
    size = tok.get_vocab_size()
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": size,
              "rope_theta": 500000.0, "tie_word_embeddings": True, "max_position_embeddings": 2048,
              "bos_token_id": bos, "eos_token_id": [bos + 1, bos + 4]}
    mx.random.seed(6)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    return out
