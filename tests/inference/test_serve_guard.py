"""`mlxft serve` facing a network: API key on every endpoint, no open bind without one, prompts
longer than the context refused, clients that leave free the generation thread at once, a timeout."""

from __future__ import annotations

import http.client
import importlib
import json
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

openai = pytest.importorskip("openai")

from mlxft.inference import serve_guard  # noqa: E402
from mlxft.cli import main  # noqa: E402
from mlxft.inference.serve import Limits, load_engine, make_server  # noqa: E402
from mlxft.inference.serve_guard import authorized, check_bind, is_loopback  # noqa: E402

KEY = "sk-test-0123456789"
MSGS = [{"role": "user", "content": "alpha x y"}]
STEP = 0.05  # seconds per token of the slowed generation


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = load_engine(str(tiny_model), [], Limits(max_tokens_cap=400), log=lambda *_: None)
    yield eng
    eng.stop()


def serve(engine, api_key=KEY, **limits):
    """A server on a free port over `engine` (limits changed for this server only)."""
    engine.limits = Limits(**{**vars(engine.limits), **limits})
    srv = make_server(engine, "127.0.0.1", 0, api_key=api_key)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def server(engine):
    saved = engine.limits
    srv = serve(engine)
    yield srv
    srv.shutdown()
    srv.server_close()
    engine.limits = saved


@pytest.fixture
def slow(monkeypatch):
    """Every generation makes max_tokens tokens, STEP seconds each; `made` counts them."""
    made = []

    def stream_generate(model, tokenizer, ids, max_tokens, sampler):
        for i in range(max_tokens):
            time.sleep(STEP)
            made.append(1)
            yield SimpleNamespace(text="x", generation_tokens=i + 1, finish_reason="length" if i + 1 == max_tokens else None)

    # where the server looks it up: mlxft.inference.serve imports mlx-lm's stream_generate by name
    monkeypatch.setattr(importlib.import_module("mlxft.inference.serve"), "stream_generate", stream_generate)
    return made


def client(server, key=KEY):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key=key, max_retries=0,
                         timeout=30)


def raw(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data) if data else None


def post_and_leave(server, body: dict, read_first: bool):
    """Send a request on a bare socket, optionally read the first bytes of the answer, then hang up."""
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    if read_first:
        assert b"200 OK" in sock.recv(4096)
    else:
        time.sleep(0.3)  # the generation has started
    sock.close()


# ---------------------------------------------------------------- the API key


def test_the_openai_client_with_the_key_works_and_without_it_gets_401(server):
    reply = client(server).chat.completions.create(model="base", messages=MSGS, max_tokens=3, temperature=0)
    assert reply.choices[0].message.content is not None
    for key in ("wrong", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError):
            client(server, key).chat.completions.create(model="base", messages=MSGS, max_tokens=3)
    status, _, _ = raw(server, "POST", "/v1/chat/completions", json.dumps({"messages": MSGS}).encode())
    assert status == 401  # no Authorization header at all (the openai client always sends one)
    assert [m.id for m in client(server).models.list()] == ["base"]


@pytest.mark.parametrize("method,path", [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"),
                                         ("POST", "/v1/chat/completions"), ("POST", "/admin/adapters"),
                                         ("DELETE", "/admin/adapters/a"), ("GET", "/nowhere")])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {KEY}", f"bearer{KEY}", KEY])
def test_every_endpoint_checks_the_key(server, method, path, auth):
    body = json.dumps({"model": "base", "messages": MSGS, "prompt": "x"}).encode() if method == "POST" else None
    status, headers, payload = raw(server, method, path, body, {"Authorization": auth} if auth else {})
    assert status == 401 and headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert payload["error"]["type"] == "authentication_error"
    assert raw(server, "GET", "/health", headers={"Authorization": f"Bearer {KEY}"})[0] == 200


def test_big_body_without_key_is_401_not_a_reset(server):
    status, _, payload = raw(server, "POST", "/v1/chat/completions", b"x" * 900_000)
    assert status == 401 and "API key" in payload["error"]["message"]


def test_the_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = serve_guard.hmac.compare_digest
    monkeypatch.setattr(serve_guard.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert authorized(f"Bearer {KEY}", KEY) and not authorized("Bearer nope", KEY) and not authorized(None, KEY)
    assert len(calls) == 3 and all(len(a) == len(b) == 32 for a, b in calls)  # equal-length digests: no length leak


# ---------------------------------------------------------------- the bind rule


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.com", ""))


def test_beyond_loopback_without_a_key_refuses_to_start(monkeypatch, tmp_path):
    from mlxft.inference import serve as serve_mod
    from mlxft.errors import MlxftError

    def reached(*_a, **_kw):
        raise MlxftError("REACHED load_engine")

    monkeypatch.setattr(serve_mod, "load_engine", reached)
    monkeypatch.delenv("MLXFT_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.5"):
        res = CliRunner().invoke(main, ["serve", "--host", host, "--base", str(tmp_path)])
        assert res.exit_code == 1 and "REACHED" not in res.output, res.output
        assert f"refusing to listen on {host} without an API key" in res.output and "--insecure-no-auth" in res.output
    for extra, env in ((["--insecure-no-auth"], {}), (["--api-key", KEY], {}), ([], {"MLXFT_API_KEY": KEY})):
        res = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--base", str(tmp_path), *extra], env=env)
        assert "REACHED load_engine" in res.output, (extra, res.output)
    res = CliRunner().invoke(main, ["serve", "--base", str(tmp_path)])  # loopback needs no key
    assert "REACHED load_engine" in res.output
    res = CliRunner().invoke(main, ["serve", "--api-key", " ", "--base", str(tmp_path)])
    assert res.exit_code == 1 and "API key is empty" in res.output
    assert "insecure" in check_bind("0.0.0.0", None, True)


# ---------------------------------------------------------------- per-request limits


def test_a_prompt_longer_than_the_context_is_400_naming_the_limit(server, engine):
    assert engine.limits.context_tokens == 2048  # read from the model's config.json
    long = " ".join(["alpha"] * 2100)
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="base", messages=[{"role": "user", "content": long}], max_tokens=3)
    assert "context is 2048 tokens" in str(e.value) and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context is 2048 tokens"):  # streamed: still a status code
        list(client(server).completions.create(model="base", prompt=long, max_tokens=3, stream=True))
    assert client(server).chat.completions.create(model="base", messages=MSGS, max_tokens=2).choices


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_frees_the_worker_at_once(server, slow, stream):
    post_and_leave(server, {"model": "base", "messages": MSGS, "max_tokens": 200, "stream": stream}, read_first=stream)
    tic = time.perf_counter()
    reply = client(server).chat.completions.create(model="base", messages=MSGS, max_tokens=2)
    waited = time.perf_counter() - tic
    assert reply.choices[0].message.content == "xx"
    assert waited < 40 * STEP, f"the next request waited {waited:.1f} s behind an abandoned generation"
    assert len(slow) < 60  # the abandoned one stopped long before its 200 tokens


def test_a_request_past_its_timeout_is_504_and_frees_the_worker(engine, slow):
    srv = serve(engine, request_timeout=1.0)
    try:
        tic = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as e:
            client(srv).chat.completions.create(model="base", messages=MSGS, max_tokens=200)
        assert e.value.status_code == 504 and "1 s limit" in str(e.value)
        assert time.perf_counter() - tic < 1.0 + 30 * STEP
        chunks = []
        with pytest.raises(openai.APIError, match="1 s limit"):  # streamed: the error arrives as an event
            for chunk in client(srv).chat.completions.create(model="base", messages=MSGS, max_tokens=200, stream=True):
                chunks.append(chunk)
        assert 0 < len(chunks) < 100  # it ended early instead of running its 200 tokens
        assert client(srv).chat.completions.create(model="base", messages=MSGS, max_tokens=2).choices[0].message.content == "xx"
    finally:
        srv.shutdown()
        srv.server_close()
