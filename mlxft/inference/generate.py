"""Generate and chat with a base model or a run (base + its adapters).

A run brings its own system prompt and chat template, so what the model sees at
inference is token-for-token what it was trained on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlxft  # noqa: F401
import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from mlxft.data.encode import prompt_ids
from mlxft.errors import MlxftError
from mlxft.models.load import load_base, load_run_base
from mlxft.runs.run import Run, is_run


@dataclass
class Loaded:
    model: object
    tokenizer: object
    system_prompt: str | None  # the run's training system prompt (None for a plain model)
    description: str

    def system(self, override: str | None = None) -> str | None:
        """`override` (a --system flag) when given, else the prompt the run was trained with."""
        return override if override is not None else self.system_prompt


@dataclass
class Sampling:
    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 256
    seed: int | None = None


def load_target(target: str) -> Loaded:
    """`target` is a run folder (base + adapters) or a model source (builtin:, folder, .gguf, hub id)."""
    if is_run(target):
        run = Run.open(target)
        base = load_run_base(run, with_adapters=True)
        return Loaded(base.model, base.tokenizer, run.system_prompt, f"{base.path} + {run.adapters}")
    if Path(target).is_dir() and (Path(target) / "adapter_config.json").is_file():
        raise MlxftError(f"{target} is an adapter folder; pass the run folder that contains it")
    base = load_base(target, None, training=False)
    return Loaded(base.model, base.tokenizer, None, str(base.path))


def stream(loaded: Loaded, messages: list[dict], system: str | None, sampling: Sampling) -> Iterator[str]:
    """Yield text pieces of the assistant's reply to `messages`."""
    if sampling.seed is not None:
        mx.random.seed(sampling.seed)
    sampler = make_sampler(sampling.temp, sampling.top_p, sampling.min_p, top_k=sampling.top_k)
    ids = prompt_ids(loaded.tokenizer, messages, system)
    for response in stream_generate(
        loaded.model, loaded.tokenizer, ids, max_tokens=sampling.max_tokens, sampler=sampler
    ):
        yield response.text


def generate_text(loaded: Loaded, prompt: str, system: str | None, sampling: Sampling, out=None) -> str:
    out = out or sys.stdout  # looked up per call so redirected/captured stdout works
    pieces = []
    for piece in stream(loaded, [{"role": "user", "content": prompt}], system, sampling):
        out.write(piece)
        out.flush()
        pieces.append(piece)
    out.write("\n")
    return "".join(pieces)


def chat_loop(loaded: Loaded, system: str | None, sampling: Sampling, read=input, out=None) -> None:
    """A terminal chat: /reset clears history, /exit (or Ctrl-D) leaves."""
    out = out or sys.stdout
    history: list[dict] = []
    out.write("chat: /reset clears the conversation, /exit leaves\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for piece in stream(loaded, history, system, sampling):
            out.write(piece)
            out.flush()
            reply.append(piece)
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
