"""llama.cpp, through llama-cpp-python, as a reader of exported GGUFs that no one here wrote.

Optional (``pip install 'mlxft[llamacpp]'`` or ``make llamacpp``; it builds llama.cpp from
source). Used by the slow tests and ``bench/export_bench.py``: greedy chat replies exactly as
a llama.cpp user gets them (the GGUF's own chat template rendered by llama-cpp-python, its
tokenizer, its end-of-generation tokens, an optional ``--lora`` adapter), and raw logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlxft.errors import MlxftError

INSTALL = "pip install 'mlxft[llamacpp]'  (or: make llamacpp; builds llama.cpp from source, a few minutes)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401  (lazy: optional and heavy, a compiled llama.cpp)
    except ImportError:
        return False
    return True


def load(path: Path, lora: Path | None = None, n_ctx: int = 1024, threads: int = 2, logits_all: bool = False,
         f32_cache: bool = False):
    """A llama_cpp.Llama on a GGUF file (plus a LoRA GGUF applied at scale 1, as `llama-cli --lora`).
    ``f32_cache`` keeps keys/values in float32 instead of llama.cpp's default float16 (for logit checks)."""
    try:
        from llama_cpp import Llama  # lazy: optional compiled dependency
    except ImportError:
        raise MlxftError(f"llama.cpp is not installed: {INSTALL}") from None
    cache = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0, **cache)


def chat_reply(llm, messages: list[dict], max_tokens: int) -> str:
    """Greedy reply to a chat, prompt built from the GGUF's own chat template by llama-cpp-python."""
    out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                     top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0)
    return out["choices"][0]["message"]["content"] or ""


def chat_prompt_ids(llm, messages: list[dict]) -> list[int]:
    """The ids llama-cpp-python feeds the model for a chat (its Jinja rendering + llama.cpp's tokenizer)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # lazy: optional compiled dependency

    meta = llm.metadata
    vocab = [llm.detokenize([i], special=True).decode("utf-8", "replace") for i in
             (int(meta.get("tokenizer.ggml.bos_token_id", 0)), int(meta.get("tokenizer.ggml.eos_token_id", 0)))]
    rendered = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=vocab[1], bos_token=vocab[0])(
        messages=messages)
    return llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)


def logits(llm, ids: list[int]) -> np.ndarray:
    """Logits at every position of ``ids`` (needs ``load(..., logits_all=True)``)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)
