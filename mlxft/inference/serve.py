"""An OpenAI-compatible server for a base model and any number of LoRA adapters.

    mlxft serve --adapter support=runs/support-20250101-120000 --adapter sql=runs/sql-... [--port 8080]

The request's `model` picks the adapter ("base" = no adapter). The base is loaded once;
adapters are switched per request (see adapter_pool.py). Each adapter is served with the
system prompt and chat template it was trained with, through mlxft.data.encode.prompt_ids, so
the prompt ids are the training ids.

One generation thread runs every generation (and every adapter switch): mlx streams are
per thread and the active adapter is global model state, so serialising is what makes
answers correct under concurrency. HTTP requests wait in a bounded queue.
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import mlxft  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from mlxft.data.encode import prompt_ids
from mlxft.errors import MlxftError
from mlxft.inference.adapter_pool import AdapterError, AdapterPool, BASE_NAME, read_adapter, validate_name
from mlxft.inference.serve_guard import ClientGone, authorized, client_gone, model_context
from mlxft.models.load import load_base

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000  # a chat request is a few KB; 1 MB stops memory abuse
    max_tokens_cap: int = 2048  # longest answer a request may ask for
    default_max_tokens: int = 256
    max_queue: int = 32  # requests waiting for the generation thread before 429
    request_timeout: float = 300.0  # seconds from arrival to the last token (queue wait included), then 504
    context_tokens: int | None = None  # the model's context (load_engine reads it); longer prompts get 400


class RequestError(Exception):
    """A client mistake: becomes an OpenAI-shaped error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


@dataclass
class Job:
    model: str
    messages: list[dict] | None  # chat request
    prompt: str | None  # completion request
    max_tokens: int
    temp: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    out: queue.Queue = field(default_factory=queue.Queue)
    cancelled: bool = False  # set by the handler when its client leaves: the generation stops at the next token
    deadline: float = float("inf")  # time.monotonic() past which the request has timed out


class Engine:
    """The adapter pool plus the single thread that generates with it."""

    def __init__(self, pool: AdapterPool, limits: Limits):
        self.pool, self.limits = pool, limits
        self.jobs: queue.Queue = queue.Queue(maxsize=limits.max_queue)
        self.thread = threading.Thread(target=self._loop, name="mlxft-generate", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            task = self.jobs.get()
            if task is None:
                return
            task()

    def stop(self):
        self.jobs.put(None)

    def call(self, fn: Callable, timeout: float = 120.0):
        """Run fn on the generation thread (between generations) and return its result."""
        box: queue.Queue = queue.Queue()

        def task():
            try:
                box.put((True, fn()))
            except Exception as e:  # delivered to the caller's thread
                box.put((False, e))

        self.jobs.put(task, timeout=timeout)
        ok, value = box.get()
        if not ok:
            raise value
        return value

    def submit(self, job: Job) -> None:
        job.deadline = time.monotonic() + self.limits.request_timeout
        try:
            self.jobs.put_nowait(lambda: self._generate(job))
        except queue.Full:
            raise RequestError(429, f"server busy: {self.limits.max_queue} requests already queued; retry later",
                               "rate_limit_error") from None

    def _generate(self, job: Job):
        try:
            if job.cancelled or time.monotonic() > job.deadline:  # its client left, or it waited too long
                return
            self.pool.activate(job.model)
            tok = self.pool.tokenizer
            if job.messages is not None:
                ids = prompt_ids(tok, job.messages, self.pool.system_prompt(job.model))
            else:
                ids = tok.encode(job.prompt)
            context = self.limits.context_tokens
            if context and len(ids) >= context:
                raise RequestError(400, f"the prompt is {len(ids)} tokens; this model's context is {context} tokens "
                                   "(prompt and answer must fit in it)", code="context_length_exceeded")
            if job.seed is not None:
                mx.random.seed(job.seed)
            sampler = make_sampler(job.temp, job.top_p, job.min_p, top_k=job.top_k)
            n, reason = 0, "length"
            max_tokens = min(job.max_tokens, context - len(ids)) if context else job.max_tokens
            for r in stream_generate(self.pool.model, tok, ids, max_tokens=max_tokens, sampler=sampler):
                n = r.generation_tokens
                reason = r.finish_reason or reason
                job.out.put(("text", r.text))
                if job.cancelled:
                    return  # nobody is listening: free the thread for the next request now
                if time.monotonic() > job.deadline:
                    raise _timed_out(self.limits)
            job.out.put(("done", {"finish_reason": reason, "prompt_tokens": len(ids), "completion_tokens": n}))
        except RequestError as e:
            job.out.put(("error", e))
        except Exception as e:  # never let one request kill the generation thread
            job.out.put(("error", RequestError(500 if not isinstance(e, (MlxftError, ValueError)) else 400,
                                               f"{type(e).__name__}: {e}", "server_error")))


def _timed_out(limits: Limits) -> "RequestError":
    return RequestError(504, f"the request took longer than the server's {limits.request_timeout:g} s limit "
                        "(--request-timeout)", "timeout_error", code="timeout")


# ---------------------------------------------------------------- request parsing


def _number(body: dict, key: str, default, lo, hi, kind=(int, float)):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        raise RequestError(400, f"'{key}' must be a number in [{lo}, {hi}], got {value!r}")
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(400, f"messages[{i}].content: only text parts are supported")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{i}].content must be a string")
    return content


def parse_job(body, chat: bool, engine: Engine) -> tuple[Job, bool]:
    """Validate a /v1/chat/completions or /v1/completions body; returns the job and whether to stream."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model", BASE_NAME)
    names = engine.pool.names()
    if not isinstance(model, str) or model not in names:
        raise RequestError(404, f"model {model!r} not found; available: {', '.join(names)}", code="model_not_found")
    messages = prompt = None
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}")
        messages = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RequestError(400, f"messages[{i}] needs a role of system, user or assistant")
            messages.append({"role": m["role"], "content": _content(m, i)})
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string")
    if body.get("n", 1) != 1:
        raise RequestError(400, "only n=1 is supported")
    limits = engine.limits
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    default = min(limits.default_max_tokens, limits.max_tokens_cap)  # a cap below the default lowers it
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default, 1, limits.max_tokens_cap, int)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "'seed' must be an integer")
    job = Job(
        model=model, messages=messages, prompt=prompt, max_tokens=max_tokens,
        temp=_number(body, "temperature", 0.0, 0.0, 2.0),  # greedy unless asked: reproducible answers by default
        top_p=_number(body, "top_p", 0.0, 0.0, 1.0),
        top_k=_number(body, "top_k", 0, 0, 1_000_000, int),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=seed,
    )
    return job, stream


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "mlxft"
    default_request_version = "HTTP/1.0"  # a request line without a version still gets a status line back
    engine: Engine  # set on the subclass built by make_server
    api_key: str | None = None  # when set, every request must carry Authorization: Bearer <key>
    log_requests = False
    poll_seconds = 0.05  # how often a waiting handler checks that its client is still there

    def parse_request(self):
        # RFC 9112 2.2: a server SHOULD ignore empty lines before the request line (http.server drops the request)
        for _ in range(100):
            if self.raw_requestline.strip() or not self.raw_requestline:
                break
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.send_error(414)
                return False
        return super().parse_request()

    def log_message(self, fmt, *args):
        if self.log_requests:
            super().log_message(fmt, *args)

    def _json(self, status: int, payload: dict):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="mlxft"')
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError):
        self._json(e.status, {"error": {"message": str(e), "type": e.kind, "param": None, "code": e.code}})

    def _authorize(self):
        if self.api_key is not None and not authorized(self.headers.get("Authorization"), self.api_key):
            self._drain_body()  # unread bytes would reset the connection before the client reads the 401
            raise RequestError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                               "authentication_error", code="invalid_api_key")

    def _drain_body(self):
        """Read and drop a body we refuse, so the client sees our answer, not a reset; then close."""
        self.close_connection = True  # the unread rest must not be parsed as a next request
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        if 0 < length <= 16 * self.engine.limits.max_body_bytes:
            while length > 0 and (chunk := self.rfile.read(min(length, 1 << 16))):
                length -= len(chunk)

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "bad Content-Length header") from None
        if length > self.engine.limits.max_body_bytes:
            self._drain_body()
            raise RequestError(413, f"request body of {length} bytes exceeds the {self.engine.limits.max_body_bytes}-byte limit")
        if length < 0:
            raise RequestError(400, f"bad Content-Length header ({length})")
        data = self.rfile.read(length)
        if len(data) < length:
            self.close_connection = True
            raise RequestError(400, f"the body ended after {len(data)} of the {length} bytes its Content-Length announced")
        try:
            return json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError(400, "the request body is JSON nested too deeply") from None

    def _dispatch(self, fn):
        try:
            self._authorize()
            fn()
        except RequestError as e:
            self._error(e)
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except TimeoutError:  # the socket timeout: a client too slow to send its request or read the answer
            self.close_connection = True
            try:
                self._error(RequestError(408, f"no complete request within {self.timeout:g} s", "timeout_error"))
            except OSError:
                pass
        except Exception as e:  # a bug must cost one request, never the server
            self._error(RequestError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def do_GET(self):
        self._dispatch(self._get)

    def do_POST(self):
        self._dispatch(self._post)

    def do_DELETE(self):
        self._dispatch(self._delete)

    def _get(self):
        if self.path == "/health":
            return self._json(200, {"status": "ok", "models": self.engine.pool.names()})
        if self.path == "/v1/models":
            now = int(time.time())
            data = [{"id": n, "object": "model", "created": now, "owned_by": "mlxft"} for n in self.engine.pool.names()]
            return self._json(200, {"object": "list", "data": data})
        raise RequestError(404, f"no route GET {self.path}")

    def _post(self):
        if self.path in ("/v1/chat/completions", "/v1/completions"):
            return self._complete(chat=self.path == "/v1/chat/completions")
        if self.path == "/admin/adapters":
            return self._admin_add()
        raise RequestError(404, f"no route POST {self.path}")

    def _delete(self):
        prefix = "/admin/adapters/"
        if not self.path.startswith(prefix):
            raise RequestError(404, f"no route DELETE {self.path}")
        self._loopback_only()
        name = self._admin_name(self.path[len(prefix):])
        self.engine.call(lambda: self.engine.pool.remove(name))
        self._json(200, {"deleted": name})

    def _loopback_only(self):
        if self.client_address[0] not in LOOPBACK:
            raise RequestError(403, "admin endpoints answer loopback clients only", "permission_error")

    def _admin_name(self, name):
        try:
            return validate_name(name)
        except AdapterError as e:
            raise RequestError(400, str(e)) from None

    def _admin_add(self):
        self._loopback_only()
        body = self._body()
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            raise RequestError(400, "send {\"name\": NAME, \"path\": RUN_OR_ADAPTERS_FOLDER}")
        name = self._admin_name(body.get("name"))
        try:
            adapter = read_adapter(name, Path(body["path"]))
            self.engine.call(lambda: self.engine.pool.add(adapter))
        except AdapterError as e:
            raise RequestError(409 if "already loaded" in str(e) else 400, str(e)) from None
        self._json(201, {"added": name, "path": str(adapter.path)})

    def _complete(self, chat: bool):
        job, stream = parse_job(self._body(), chat, self.engine)
        self.engine.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        base = {"id": rid, "created": int(time.time()), "model": job.model}
        try:
            if stream:
                self._stream(job, chat, base)
            else:
                self._whole(job, chat, base)
        finally:
            job.cancelled = True  # a dropped client stops its generation at the next token

    def _events(self, job: Job):
        """The job's events; a client that leaves or a request past its deadline ends the wait at once."""
        checked = time.monotonic()
        while True:
            try:
                kind, value = job.out.get(timeout=self.poll_seconds)
            except queue.Empty:
                kind = None
            if kind is None or time.monotonic() - checked >= self.poll_seconds:
                checked = time.monotonic()
                if client_gone(self.connection):
                    job.cancelled = True
                    raise ClientGone()
                if checked > job.deadline + 1.0:  # the generation thread itself is stuck (a very long prefill)
                    job.cancelled = True
                    raise _timed_out(self.engine.limits)
            if kind is None:
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    def _whole(self, job: Job, chat: bool, base: dict):
        pieces, done = [], {}
        for kind, value in self._events(job):
            if kind == "text":
                pieces.append(value)
            else:
                done = value
        text = "".join(pieces)
        choice = {"index": 0, "finish_reason": done["finish_reason"]}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None})
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}
        self._json(200, {**base, "object": "chat.completion" if chat else "text_completion", "choices": [choice], "usage": usage})

    def _stream(self, job: Job, chat: bool, base: dict):
        events = self._events(job)
        first = next(events)  # an error before the first token still gets a proper status code
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(text: str | None, finish: str | None, role: bool = False):
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            self.wfile.write(f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n".encode())
            self.wfile.flush()

        send("", None, role=True)
        try:
            for kind, value in itertools.chain([first], events):
                if kind == "text":
                    if value:
                        send(value, None)
                else:
                    send(None, value["finish_reason"])
        except RequestError as e:  # headers are sent: the error goes in the stream, as OpenAI's API does
            error = {"message": str(e), "type": e.kind, "param": None, "code": e.code}
            self.wfile.write(f"data: {json.dumps({'error': error})}\n\n".encode())
            self.close_connection = True
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server bound to host:port (port 0 = any free port); call serve_forever() on it.
    With `api_key`, every request needs Authorization: Bearer <api_key> (else 401)."""
    # timeout: the socket's, so a client that stalls sending its request or reading the answer is dropped
    handler = type("BoundHandler", (Handler,), {"engine": engine, "api_key": api_key,
                                                "timeout": engine.limits.request_timeout})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def load_engine(base: str | None, adapters: list[tuple[str, str]], limits: Limits | None = None, log=print) -> Engine:
    """Read every adapter, load the base once (default: the base the adapters were trained on), attach them."""

    read = [read_adapter(name, path) for name, path in adapters]
    names = [a.name for a in read]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must be unique, got {', '.join(names)}")
    if base is None:
        sources = {a.base_source for a in read}
        if not read or None in sources or len(sources) != 1:
            raise MlxftError("pass --base MODEL: " + (
                "no adapters given" if not read else f"the adapters do not name one base ({', '.join(map(str, sources))})"))
        base = sources.pop()
    loaded = load_base(base, None, training=False)
    log(f"base model: {loaded.path} [{loaded.precision}]")
    pool = AdapterPool(loaded.model, loaded.tokenizer, loaded.tokenizer.chat_template)
    for a in read:
        pool.add(a)
        log(f"adapter {a.name}: {a.path}")
    limits = limits or Limits()
    if limits.context_tokens is None:
        limits.context_tokens = model_context(loaded.path)
    return Engine(pool, limits)


def parse_adapter_args(values) -> list[tuple[str, str]]:
    """`NAME=PATH` strings from the command line."""
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not path:
            raise AdapterError(f"--adapter takes NAME=PATH, got {v!r}")
        out.append((validate_name(name), path))
    return out
