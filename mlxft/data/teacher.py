"""Teachers for `mlxft synth` (and its LLM judge): something that answers chat conversations.

`open_teacher(spec)` picks by the spec: an http(s):// URL is any OpenAI-compatible
endpoint (`mlxft serve`, llama.cpp's server, vLLM, a hosted API), anything else is what
`mlxft generate` loads (builtin:NAME, a model folder, a .gguf, a hub id, or a run folder,
i.e. a base with its adapter). `FunctionTeacher` wraps a Python callable.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from mlxft.errors import ModelError


@dataclass
class TeacherSampling:
    temp: float = 0.7  # some variety: greedy decoding of a cycled seed repeats itself
    top_p: float = 0.95
    max_tokens: int = 256


@dataclass
class Reply:
    text: str
    truncated: bool = False  # stopped at max_tokens: the answer is probably cut off


class FunctionTeacher:
    """A Python callable (conversation -> text) as a teacher: for tests and library use."""

    def __init__(self, fn: Callable[[list[dict]], str], name: str = "function"):
        self.fn, self.name = fn, name

    def complete(self, conversations: list[list[dict]], sampling: TeacherSampling, seed: int) -> list[Reply]:
        return [Reply(self.fn(c)) for c in conversations]


class LocalTeacher:
    """A local MLX model (optionally a run: base + adapter), answering a batch at a time."""

    batch_size = 8  # mlx-lm's batched generation: several prompts for about the price of one on CPU

    def __init__(self, target: str):
        from mlxft.inference.generate import load_target  # lazy: a URL teacher runs without loading mlx

        self.loaded = load_target(target)
        self.name = target

    def complete(self, conversations: list[list[dict]], sampling: TeacherSampling, seed: int) -> list[Reply]:
        import mlx.core as mx  # lazy: a URL teacher runs without loading mlx
        from mlx_lm.generate import batch_generate
        from mlx_lm.sample_utils import make_sampler
        from mlxft.data.encode import prompt_ids

        tok = self.loaded.tokenizer
        mx.random.seed(seed)
        prompts = [prompt_ids(tok, c, self.loaded.system_prompt) for c in conversations]
        out = batch_generate(self.loaded.model, tok, prompts, max_tokens=sampling.max_tokens, return_token_ids=True,
                             sampler=make_sampler(sampling.temp, sampling.top_p), completion_batch_size=self.batch_size,
                             prefill_batch_size=self.batch_size)
        return [Reply(text, len(ids) >= sampling.max_tokens) for text, ids in zip(out.texts, out.token_ids)]


def chat_url(url: str) -> str:
    """http://host:port, .../v1 or .../v1/chat/completions -> the chat completions endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class HttpTeacher:
    """Any OpenAI-compatible /v1/chat/completions endpoint, over plain urllib (no client library needed).

    The API key, when the endpoint needs one, comes from $MLXFT_TEACHER_API_KEY or $OPENAI_API_KEY.
    """

    batch_size = 8
    retries = 3  # 429/5xx are retried with backoff: a busy local server is normal

    def __init__(self, url: str, model: str | None = None, timeout: float = 600.0):
        if not url.startswith(("http://", "https://")):
            raise ModelError(f"teacher URL must start with http:// or https://, got {url!r}")
        self.endpoint = chat_url(url)
        self.timeout = timeout
        self.key = os.environ.get("MLXFT_TEACHER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model = model or self._first_model()
        self.name = f"{url} ({self.model})"

    def _request(self, url: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code in (429, 500, 502, 503) and attempt < self.retries:
                    time.sleep(2**attempt)
                    continue
                raise ModelError(f"teacher {url} answered HTTP {e.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as e:
                raise ModelError(f"cannot reach the teacher at {url}: {getattr(e, 'reason', e)}") from None
            except json.JSONDecodeError:
                raise ModelError(f"teacher {url} did not answer JSON; is it an OpenAI-compatible endpoint?") from None
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        """The endpoint's first listed model (for `mlxft serve`: the base), or 'default' if it lists none."""
        try:
            models = self._request(self.endpoint.rsplit("/chat/completions", 1)[0] + "/models").get("data") or []
        except ModelError:
            return "default"
        return models[0].get("id", "default") if models and isinstance(models[0], dict) else "default"

    def complete(self, conversations: list[list[dict]], sampling: TeacherSampling, seed: int) -> list[Reply]:
        """One request per conversation, `batch_size` in flight at once (servers that batch answer them together)."""

        def ask(i: int) -> Reply:
            body = {"model": self.model, "messages": conversations[i], "temperature": sampling.temp,
                    "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": seed + i}
            answer = self._request(self.endpoint, body)
            try:
                choice = answer["choices"][0]
                text = choice["message"].get("content") or ""
            except (KeyError, IndexError, TypeError, AttributeError):
                raise ModelError(f"teacher {self.endpoint} answered without choices[0].message: "
                                 f"{json.dumps(answer)[:200]}") from None
            return Reply(text, choice.get("finish_reason") == "length")

        with ThreadPoolExecutor(max_workers=max(1, min(self.batch_size, len(conversations)))) as pool:
            return list(pool.map(ask, range(len(conversations))))  # in order; the first error is raised


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        return str(body.get("error", {}).get("message") or body)[:300]
    except Exception:  # not JSON: the reason phrase is all there is
        return e.reason or ""


def open_teacher(spec: str, model: str | None = None):
    """A URL -> HttpTeacher (model = the endpoint's model name); anything else -> LocalTeacher."""
    if spec.startswith(("http://", "https://")):
        return HttpTeacher(spec, model)
    if model:
        raise ModelError("--teacher-model/--judge-model names a model of an endpoint; a local teacher is the model itself")
    return LocalTeacher(spec)
