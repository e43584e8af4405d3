"""The OpenAI-compatible server, driven by the real `openai` client against a live server on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

openai = pytest.importorskip("openai")

from lora_fixtures import BRACKETS, make_adapter_run  # noqa: E402

from conftest import CHATML, SYSTEM  # noqa: E402
from mlxft.inference.adapter_pool import AdapterError, read_adapter  # noqa: E402
from mlxft.inference.serve import Engine, Job, Limits, RequestError, load_engine, make_server  # noqa: E402

MSGS = [{"role": "user", "content": "alpha x y"}]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-runs")
    a = make_adapter_run(root / "run-a", tiny_model, seed=1, system_prompt=SYSTEM)
    # b: another template, other targets and rank, no system prompt: the union of layers must work
    b = make_adapter_run(root / "run-b", tiny_model, seed=2, system_prompt=None, chat_template=BRACKETS,
                         keys=("self_attn.q_proj", "mlp.down_proj"), rank=8)
    return a, b


@pytest.fixture(scope="module")
def server(runs):
    a, b = runs
    engine = load_engine(None, [("a", str(a)), ("b", str(b / "adapters"))], Limits(max_tokens_cap=64), log=lambda *_: None)
    srv = make_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="unused", max_retries=0)


def chat(client, model, messages=MSGS, **kw):
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, **kw)
    return r.choices[0].message.content, r.usage


def raw(server, method, path, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data) if data else None


def test_models_lists_base_and_every_adapter(client):
    assert [m.id for m in client.models.list()] == ["base", "a", "b"]


def test_each_model_answers_its_own_way_streamed_or_not(client):
    answers = {m: chat(client, m)[0] for m in ("base", "a", "b")}
    assert len(set(answers.values())) == 3, answers  # the adapters really change greedy answers
    for m in ("b", "base", "a"):  # switching back and forth gives the same answers again
        assert chat(client, m)[0] == answers[m]
        stream = client.chat.completions.create(model=m, messages=MSGS, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == answers[m]
    text = client.completions.create(model="a", prompt="alpha", max_tokens=4, temperature=0).choices[0].text
    streamed = client.completions.create(model="a", prompt="alpha", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_prompt_ids_are_the_training_ids(client, server, tiny_model):
    """usage.prompt_tokens = len(prompt_ids) with the adapter's own system prompt and template."""
    from mlxft.data.encode import prompt_ids
    from mlx_lm.utils import load

    _, tok = load(str(tiny_model))
    tok._tokenizer.chat_template = CHATML
    assert chat(client, "a")[1].prompt_tokens == len(prompt_ids(tok, MSGS, SYSTEM))
    own = [{"role": "system", "content": "Be brief."}, *MSGS]  # a request's own system message is kept
    assert chat(client, "a", own)[1].prompt_tokens == len(prompt_ids(tok, own, SYSTEM)) == len(prompt_ids(tok, own))
    tok._tokenizer.chat_template = BRACKETS
    assert chat(client, "b")[1].prompt_tokens == len(prompt_ids(tok, MSGS, None))


def test_unknown_model_is_404_with_the_list(client):
    for name in ("nope", "../x", "a/b"):
        with pytest.raises(openai.NotFoundError) as e:
            chat(client, name)
        assert "base, a, b" in str(e.value)


def test_bad_requests_are_4xx_and_the_server_survives(server, client):
    assert raw(server, "POST", "/v1/chat/completions", b"{not json")[0] == 400
    status, body = raw(server, "POST", "/v1/chat/completions", b"x" * 1_000_001)
    assert status == 413 and "limit" in body["error"]["message"]
    for bad in ({"model": "a"}, {"model": "a", "messages": "hi"}, {"model": "a", "messages": [{"role": 3}]},
                {"model": "a", "messages": MSGS, "max_tokens": 10_000}, {"model": "a", "messages": MSGS, "temperature": "hot"},
                [1, 2]):
        status, body = raw(server, "POST", "/v1/chat/completions", json.dumps(bad).encode())
        assert status == 400 and body["error"]["type"] == "invalid_request_error", (bad, body)
    assert raw(server, "GET", "/health")[1]["status"] == "ok"
    assert chat(client, "base")[0]


def test_admin_adds_and_removes_adapters_at_run_time(server, client, runs):
    a, _ = runs
    for name in ("../x", "a/b", ".hidden"):
        status, body = raw(server, "POST", "/admin/adapters", json.dumps({"name": name, "path": str(a)}).encode())
        assert status == 400 and "invalid adapter name" in body["error"]["message"]
    status, body = raw(server, "POST", "/admin/adapters", json.dumps({"name": "c", "path": "/etc"}).encode())
    assert status == 400 and "neither an mlxft run" in body["error"]["message"]
    assert raw(server, "POST", "/admin/adapters", json.dumps({"name": "c", "path": str(a)}).encode())[0] == 201
    assert chat(client, "c")[0] == chat(client, "a")[0]
    assert raw(server, "DELETE", "/admin/adapters/c")[0] == 200
    assert raw(server, "DELETE", "/admin/adapters/..%2Fx")[0] == 400
    with pytest.raises(openai.NotFoundError):
        chat(client, "c")


def test_full_queue_is_429(server):
    engine = Engine(server.RequestHandlerClass.engine.pool, Limits(max_queue=1))
    release = threading.Event()
    engine.jobs.put(release.wait)  # the generation thread is busy with this
    while not engine.jobs.empty():
        time.sleep(0.01)
    job = lambda: Job("base", MSGS, None, 2, 0.0, 0.0, 0, 0.0, None)  # noqa: E731
    waiting = job()
    engine.submit(waiting)  # waits in the queue
    with pytest.raises(RequestError) as e:
        engine.submit(job())
    assert e.value.status == 429
    waiting.cancelled = True  # never generate on this second engine: the module's server shares the pool
    release.set()
    engine.stop()


def test_bad_adapter_names_and_folders_refused_at_load(tmp_path):
    with pytest.raises(AdapterError, match="invalid adapter name"):
        read_adapter("../x", tmp_path)
    with pytest.raises(AdapterError, match="neither"):
        read_adapter("ok", tmp_path)


def test_cli_refuses_bad_adapter_args(tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import main

    for arg in ("../x=" + str(tmp_path), "nopath", f"ok={tmp_path}"):
        r = CliRunner().invoke(main, ["serve", "--adapter", arg], catch_exceptions=False)
        assert r.exit_code == 1 and "Traceback" not in r.output and r.output.startswith("mlxft: error:"), r.output
