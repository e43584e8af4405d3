"""Fuzz targets for what reaches mlxft from outside: the server's request bodies, raw HTTP requests
(methods, paths, headers, bodies) against a live `mlxft serve` with an API key, and GGUF files
(header, metadata, tensor table) through `import-gguf`.

A server answer holds the property when it is an HTTP answer other than 500, within the time
limit, and the server still answers a good request afterwards. A GGUF with hostile sizes and
counts must be refused fast, without allocating what it claims.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import tracemalloc
from functools import lru_cache
from pathlib import Path

from hypothesis import strategies as st

from fuzz_harness import TEXT_NOISE, Outcome, json_values, mutate, probe, workdir
from fuzz_targets import Target
from fuzz_targets_runs import tiny_adapter_run, tiny_pool
from mlxft.errors import MlxftError

KEY = "sk-fuzz-key"
BODY_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "min_p", "n", "stream", "seed", "stop", "role", "content", "type", "text", "name", "path", "user"]
MODELS = ["base", "a", "base", "a", "b", "", "../a", "a" * 300, None, 1]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/admin/adapters", "/admin/adapters/a",
         "/admin/adapters/..%2F..", "/v1/chat/completions?x=1", "//v1/models", "/v1/../health", "*", "/" + "a" * 5000]
MAX_PEAK_BYTES = 64 * 2**20  # a GGUF header may not make the importer allocate more than this before refusing


# ---------------------------------------------------------------- request bodies (parse_job)

contents = TEXT_NOISE | json_values(["type", "text", "image_url"], 4)
plain = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT_NOISE})
messages = st.one_of(
    st.lists(plain, min_size=1, max_size=3).map(lambda m: m + [{"role": "user", "content": "hi"}]),  # mostly valid
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "", None]),
                                    "content": contents}), max_size=4),
    json_values(max_leaves=4))
bodies = st.one_of(
    st.fixed_dictionaries({"model": st.sampled_from(MODELS), "messages": messages}, optional={
        k: json_values(max_leaves=2) | st.integers(-1, 10**6) | st.floats()
        for k in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "seed")}),
    st.fixed_dictionaries({"model": st.sampled_from(MODELS), "prompt": contents | st.lists(contents, max_size=2)},
                          optional={"max_tokens": st.integers(-5, 10**9) | json_values(max_leaves=1)}),
    json_values(BODY_KEYS),
)


@lru_cache(maxsize=1)
def _engine():
    from mlxft.inference.adapter_pool import read_adapter
    from mlxft.inference.serve import Engine, Limits

    pool = tiny_pool()
    if "a" not in pool.adapters:
        pool.add(read_adapter("a", tiny_adapter_run()))
    return Engine(pool, Limits(max_tokens_cap=8, max_queue=8, request_timeout=15.0))


def run_body(case) -> Outcome:
    from mlxft.data.encode import prompt_ids
    from mlxft.inference.serve import RequestError, parse_job

    chat, body = case
    engine = _engine()

    def call():
        try:
            job, _ = parse_job(body, chat, engine)
        except RequestError as e:
            assert 400 <= e.status < 500, f"status {e.status} for a client mistake: {e}"
            raise MlxftError(str(e)) from None
        tok = engine.pool.tokenizer
        ids = prompt_ids(tok, job.messages, None) if chat else tok.encode(job.prompt)
        assert ids and 1 <= job.max_tokens <= engine.limits.max_tokens_cap

    return probe(call)


SERVE_BODY = Target("serve: request bodies", st.tuples(st.booleans(), bodies), [
    ("not an object", (True, [1, 2])), ("null", (True, None)), ("no messages", (True, {"model": "base"})),
    ("messages a string", (True, {"messages": "hi"})), ("role missing", (True, {"messages": [{"content": "x"}]})),
    ("image part", (True, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})),
    ("max_tokens huge", (True, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12})),
    ("max_tokens bool", (True, {"messages": [{"role": "user", "content": "x"}], "max_tokens": True})),
    ("temperature NaN", (True, {"messages": [{"role": "user", "content": "x"}], "temperature": float("nan")})),
    ("top_k float", (True, {"messages": [{"role": "user", "content": "x"}], "top_k": 1.5})),
    ("n=2", (True, {"messages": [{"role": "user", "content": "x"}], "n": 2})),
    ("stream a string", (True, {"messages": [{"role": "user", "content": "x"}], "stream": "yes"})),
    ("seed huge", (True, {"messages": [{"role": "user", "content": "x"}], "seed": 2**80})),
    ("model traversal", (True, {"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]})),
    ("model a list", (True, {"model": ["base"], "messages": [{"role": "user", "content": "x"}]})),
    ("prompt empty", (False, {"prompt": ""})), ("prompt list of 2", (False, {"prompt": ["a", "b"]})),
    ("prompt tokens", (False, {"prompt": [1, 2, 3]})),
    ("template injection", (True, {"messages": [{"role": "user", "content": "{{ 7*7 }}{% raise %}<|im_end|>"}]})),
], run_body)


# ---------------------------------------------------------------- raw HTTP against a live server

_server = {}


def server_port() -> int:
    if "srv" not in _server:
        from mlxft.inference.serve import make_server

        srv = make_server(_engine(), "127.0.0.1", 0, api_key=KEY)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        _server["srv"] = srv
    return _server["srv"].server_address[1]


def stop() -> None:
    """Shut the fuzz server and its generation thread down (bench end)."""
    srv = _server.pop("srv", None)
    if srv is not None:
        srv.shutdown()
        srv.server_close()
    if _engine.cache_info().currsize:
        _engine().stop()
        _engine.cache_clear()


def exchange(request: bytes, half_close: bool = False, timeout: float = 20.0) -> bytes:
    """Send `request` and read the whole answer (the server closes after one: HTTP/1.0). `half_close`
    ends our sending side, for a request that announces more body than it sends."""
    with socket.create_connection(("127.0.0.1", server_port()), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer (and close) before reading everything, e.g. a 401 on a huge header
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _request(case) -> bytes:
    method, path, auth, headers, body, length = case
    lines = [f"{method} {path} HTTP/1.1".encode("utf-8", "surrogatepass"), b"Host: fuzz"]
    if auth is not None:
        lines.append(b"Authorization: " + auth.encode("utf-8", "surrogatepass"))
    lines += [k.encode("utf-8", "surrogatepass") + b": " + v.encode("utf-8", "surrogatepass") for k, v in headers]
    if length is not None:
        lines.append(b"Content-Length: " + str(len(body) if length == "exact" else length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def run_http(case) -> Outcome:
    def call():
        try:
            method, path, auth, headers, body, length = case
            announced = [v for k, v in headers if k.lower() == "content-length"] + ([str(length)] if length != "exact" else [])
            longer = any(v.strip().isdigit() and int(v) > len(body) for v in announced if v is not None)
            answer = exchange(_request(case), half_close=longer)
        except socket.timeout:
            from fuzz_harness import Hang

            raise Hang() from None
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1."), f"no HTTP answer (got {answer[:80]!r})"
        status = int(status_line.split()[1])
        assert status != 500 and status < 600, f"{status_line!r}: {answer[-300:]!r}"
        health = exchange(f"GET /health HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode())
        assert b" 200 " in health.split(b"\r\n", 1)[0], "the server stopped answering after this request"
        if status >= 400:  # a refusal with a status code: the server's typed error
            raise MlxftError(f"HTTP {status}")

    return probe(call)


header_names = st.sampled_from(["Content-Type", "Transfer-Encoding", "Connection", "Expect", "X-" + "a" * 100,
                                "Content-Length", "Authorization"]) | st.text("abcdefghijklmnopqrstuvwxyz-", max_size=12)
http_cases = st.tuples(
    st.sampled_from(["GET", "POST", "DELETE", "PUT", "HEAD", "OPTIONS", "PATCH", "get", ""]) | st.text(max_size=8),
    st.sampled_from(PATHS) | st.text(max_size=30).map(lambda t: "/" + t),
    st.sampled_from([f"Bearer {KEY}"] * 6 + [None, "Bearer", "Bearer wrong", f"Basic {KEY}", f"Bearer  {KEY} ",
                     "Bearer " + "k" * 10_000]) | TEXT_NOISE,
    st.lists(st.tuples(header_names, TEXT_NOISE | st.sampled_from(["-1", "chunked", "close", "100-continue", "9" * 30])),
             max_size=3),
    bodies.map(lambda b: json.dumps(b).encode()) | st.binary(max_size=300),
    st.sampled_from(["exact"] * 4 + [None, 0, -1, 10**7, 10**30]) | st.integers(0, 400).map(str),
)
SERVE_HTTP = Target("serve: HTTP requests (headers + bodies)", http_cases, [
    ("no key", ("GET", "/v1/models", None, [], b"", None)),
    ("wrong key, big body", ("POST", "/v1/chat/completions", "Bearer nope", [], b"x" * 200_000, "exact")),
    ("negative Content-Length", ("POST", "/v1/chat/completions", f"Bearer {KEY}", [], b"{}", -1)),
    ("Content-Length not a number", ("POST", "/v1/completions", f"Bearer {KEY}", [("Content-Length", "ten")], b"{}", None)),
    ("Content-Length longer than the body", ("POST", "/v1/completions", f"Bearer {KEY}", [], b'{"prompt": "x"}', 5000)),
    ("body over the limit", ("POST", "/v1/completions", f"Bearer {KEY}", [], b"x" * 10, 10**7)),
    ("chunked body", ("POST", "/v1/completions", f"Bearer {KEY}", [("Transfer-Encoding", "chunked")],
                      b'5\r\n{"a":\r\n0\r\n\r\n', None)),
    ("invalid UTF-8 JSON", ("POST", "/v1/chat/completions", f"Bearer {KEY}", [], b'{"messages": "\xff"}', "exact")),
    ("deeply nested JSON", ("POST", "/v1/chat/completions", f"Bearer {KEY}", [], b"[" * 100_000, "exact")),
    ("unknown method", ("BREW", "/v1/models", f"Bearer {KEY}", [], b"", None)),
    ("blank lines before the request line", ("\r\n\r\nGET", "/health", f"Bearer {KEY}", [], b"", None)),
    ("HTTP/0.9 style line", ("GET", "/v1/models HTTP/1.1 extra", f"Bearer {KEY}", [], b"", None)),
    ("admin traversal", ("DELETE", "/admin/adapters/..%2F..%2Fetc", f"Bearer {KEY}", [], b"", None)),
    ("admin add /etc", ("POST", "/admin/adapters", f"Bearer {KEY}", [], b'{"name": "x", "path": "/etc"}', "exact")),
    ("header line 70 KB", ("GET", "/health", f"Bearer {KEY}", [("X-Big", "a" * 70_000)], b"", None)),
    ("200 headers", ("GET", "/health", f"Bearer {KEY}", [(f"X-{i}", "v") for i in range(200)], b"", None)),
], run_http)


# ---------------------------------------------------------------- GGUF


def _gstr(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def encode_value(kind: int, value) -> bytes:
    """GGUF metadata value of `kind`; ("lie", n, payload) claims length/count n for the payload that follows."""
    if isinstance(value, tuple) and value and value[0] == "lie":
        _, claimed, payload = value
        return (struct.pack("<Q", claimed) if kind == 8 else struct.pack("<IQ", 4, claimed)) + payload
    if kind == 8:
        return _gstr(str(value).encode("utf-8", "surrogatepass"))
    if kind == 9:
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], list)):
            return struct.pack("<IQ", 4, int(value) % 2**64)  # a count, and no items after it
        item_kind, items = value
        return struct.pack("<IQ", item_kind, len(items)) + b"".join(encode_value(item_kind, v) for v in items)
    fmt = _FORMATS.get(kind)
    if fmt is None:
        return b"\x00" * 4  # an unknown type id: whatever bytes follow
    try:
        return struct.pack("<" + fmt, value)
    except (struct.error, TypeError, OverflowError):
        return struct.pack("<" + fmt, 0)


def gguf_bytes(kvs, tensors, version=3, counts=None, data=b"") -> bytes:
    """A GGUF file: header, metadata [(key, kind, value)], tensor table [(name, dims, type, offset)], data."""
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    out = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    for key, kind, value in kvs:
        out += _gstr(key.encode("utf-8", "surrogatepass")) + struct.pack("<I", kind) + encode_value(kind, value)
    for name, dims, kind, offset in tensors:
        out += _gstr(name.encode("utf-8", "surrogatepass")) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d % 2**64) for d in dims) + struct.pack("<IQ", kind, offset % 2**64)
    return out + b"\x00" * (-len(out) % 32) + data


@lru_cache(maxsize=1)
def valid_gguf() -> tuple[bytes, list, list, bytes]:
    """A real 2-layer tiny llama GGUF (as tests/models/test_gguf.py writes it): bytes, metadata, tensor table, data."""
    import tempfile

    import mlx.core as mx
    import numpy as np

    import test_gguf as tg
    from mlxft.models.gguf import read_gguf_header

    model = tg.random_model(tied=False)
    weights = {tg.gguf_name(k): mx.array(tg.to_gguf_rows(tg.gguf_name(k), np.array(v))) for k, v in tg._flat(model).items()}
    metadata = {}
    for key, value in tg.gguf_metadata(model.args.vocab_size).items():
        if isinstance(value, bool):
            value = mx.array(value)
        elif isinstance(value, (int, float)):
            value = mx.array(value, dtype=mx.uint32 if isinstance(value, int) else mx.float32)
        elif isinstance(value, list) and isinstance(value[0], int):
            value = mx.array(value, dtype=mx.int32)
        metadata[key] = value
    path = Path(tempfile.mkdtemp(prefix="mlxft-fuzz-gguf-")) / "tiny.gguf"
    mx.save_gguf(str(path), weights, metadata)
    raw = path.read_bytes()
    meta, tensors = read_gguf_header(path)
    start = min(t.offset for t in tensors.values())
    kinds = {bool: 7, int: 4, float: 6, str: 8}
    kvs = [(k, 9, ({int: 5, str: 8}[type(v[0])], v)) if isinstance(v, list) else (k, kinds[type(v)], v)
           for k, v in meta.items()]
    table = [(n, list(reversed(t.shape)), 0, t.offset - start) for n, t in tensors.items()]
    return raw, kvs, table, raw[start:]


KINDS = st.integers(0, 13) | st.integers(0, 2**32 - 1)
gguf_values = st.one_of(
    st.tuples(st.sampled_from([4, 5, 10, 11]), st.integers(-(2**63), 2**64 - 1)),
    st.tuples(st.sampled_from([6, 12]), st.floats()),
    st.tuples(st.just(7), st.booleans()), st.tuples(st.just(8), TEXT_NOISE),
    st.tuples(st.just(9), st.tuples(st.sampled_from([4, 5, 8, 6]), st.lists(st.integers(0, 300), max_size=5))),
    st.tuples(st.just(9), st.tuples(st.just(9), st.lists(st.tuples(st.just(4), st.lists(st.integers(0, 9), max_size=2)),
                                                         max_size=3))),
    st.tuples(st.sampled_from([8, 9]), st.tuples(st.just("lie"), st.sampled_from([2**63, 2**40, 10**6, 2**64 - 1]),
                                                 st.binary(max_size=16))),
    st.tuples(KINDS, st.integers(0, 2**32)),
)


def _replace_kvs(kvs, changes, drops):
    keys = [k for k, _, _ in kvs]
    out = [kv for i, kv in enumerate(kvs) if i not in drops]
    for key_index, (kind, value) in changes:
        key = keys[key_index % len(keys)] if isinstance(key_index, int) else key_index
        out = [kv for kv in out if kv[0] != key] + [(key, kind, value)]
    return out


@lru_cache(maxsize=1)
def gguf_strategy():
    raw, kvs, table, data = valid_gguf()
    header_len = len(raw) - len(data)
    tensor_rows = st.tuples(st.sampled_from([n for n, *_ in table]) | st.text(max_size=12),
                            st.lists(st.sampled_from([0, 1, 64, 2**31, 2**62, 2**64 - 1]) | st.integers(0, 300), max_size=5),
                            st.integers(0, 40) | KINDS, st.integers(0, 2**64 - 1) | st.integers(0, len(data)))
    changes = st.lists(st.tuples(st.integers(0, 100) | st.sampled_from(["general.alignment", "split.count"]),
                                 gguf_values), max_size=3)
    return st.one_of(
        st.tuples(changes, st.sets(st.integers(0, len(kvs) - 1), max_size=3))
        .map(lambda c: gguf_bytes(_replace_kvs(kvs, *c), table, data=data)),
        st.lists(tensor_rows, max_size=2).map(lambda extra: gguf_bytes(kvs, table[:-1] + extra, data=data)),
        mutate(raw[:header_len]).map(lambda head: head + data),
        st.tuples(st.integers(0, 4) | st.integers(0, 2**32 - 1), st.sampled_from([None, (0, 2**63), (2**62, 1), (1, 2**40)]),
                  st.lists(st.tuples(TEXT_NOISE, KINDS, st.integers(0, 2**32)), max_size=3))
        .map(lambda c: gguf_bytes([(k, kind, v) for k, kind, v in c[2]], [], version=c[0], counts=c[1])),
        st.binary(max_size=64).map(lambda b: b"GGUF" + b),
    )


def run_gguf(data: bytes) -> Outcome:
    from mlxft.models.gguf import gguf_metadata_summary
    from mlxft.models.gguf_import import import_gguf

    if os.environ.get("MLXFT_FUZZ_LAST"):  # keep the case on disk: a crash of the process itself leaves it there
        Path(os.environ["MLXFT_FUZZ_LAST"]).write_bytes(data)
    with workdir() as tmp:
        path = tmp / "in" / "model.gguf"
        path.parent.mkdir()
        path.write_bytes(data)

        def call():
            tracemalloc.start()
            try:
                try:
                    gguf_metadata_summary(path)
                finally:
                    import_gguf(path, tmp / "out")
            finally:
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                assert peak < MAX_PEAK_BYTES, f"allocated {peak / 2**20:.0f} MB for a {len(data)}-byte file"

        return probe(call, [tmp / "in"])


def _hand_gguf() -> list[tuple[str, bytes]]:
    raw, kvs, table, data = valid_gguf()
    lie = [("general.architecture", 8, ("lie", 2**63, b"llama"))]
    return [
        ("not GGUF", b"GGML" + raw[4:]), ("empty", b""), ("magic only", b"GGUF"), ("version 1", gguf_bytes(kvs, table, 1, data=data)),
        ("2^63 metadata entries", gguf_bytes(kvs, table, counts=(len(table), 2**63), data=data)),
        ("2^62 tensors", gguf_bytes(kvs, table, counts=(2**62, len(kvs)), data=data)),
        ("string claims 2^63 bytes", gguf_bytes(lie, [])),
        ("array claims 2^40 items", gguf_bytes([("tokenizer.ggml.tokens", 9, ("lie", 2**40, b"\0" * 8))], [])),
        ("arrays nested 2000 deep", b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _gstr(b"k") + struct.pack("<I", 9)
         + struct.pack("<IQ", 9, 1) * 2000 + struct.pack("<IQ", 4, 0)),
        ("unknown value type", gguf_bytes([("k", 77, 0)], [])),
        ("alignment 0", gguf_bytes(_replace_kvs(kvs, [("general.alignment", (4, 0))], set()), table, data=data)),
        ("alignment a string", gguf_bytes(_replace_kvs(kvs, [("general.alignment", (8, "x"))], set()), table, data=data)),
        ("tensor of 2^62 x 2^62", gguf_bytes(kvs, table[:-1] + [(table[-1][0], [2**62, 2**62], 0, 0)], data=data)),
        ("tensor past the end", gguf_bytes(kvs, table[:-1] + [(table[-1][0], table[-1][1], 0, 2**40)], data=data)),
        ("tensor with 0 dims", gguf_bytes(kvs, table[:-1] + [(table[-1][0], [], 0, 0)], data=data)),
        ("tensor type 9999", gguf_bytes(kvs, table[:-1] + [(table[-1][0], table[-1][1], 9999, 0)], data=data)),
        ("block_count a string", gguf_bytes(_replace_kvs(kvs, [("llama.block_count", (8, "two"))], set()), table, data=data)),
        ("head_count 0", gguf_bytes(_replace_kvs(kvs, [("llama.attention.head_count", (4, 0))], set()), table, data=data)),
        ("architecture a list", gguf_bytes(_replace_kvs(kvs, [("general.architecture", (9, (4, [1])))], set()), table, data=data)),
        ("tokens not strings", gguf_bytes(_replace_kvs(kvs, [("tokenizer.ggml.tokens", (9, (4, [1, 2])))], set()), table, data=data)),
        ("split.count 10^9", gguf_bytes(_replace_kvs(kvs, [("split.count", (4, 10**9))], set()), table, data=data)),
        ("truncated in the data", raw[: len(raw) - len(data) // 2]),
    ]


GGUF = Target("GGUF files (import-gguf)", None, None, run_gguf)


def targets() -> dict[str, Target]:
    """The server and GGUF targets with their strategies and hand cases built (GGUF's need the tiny model)."""
    GGUF.strategy, GGUF.hand = gguf_strategy(), _hand_gguf()
    return {"serve-body": SERVE_BODY, "serve-http": SERVE_HTTP, "gguf": GGUF}
