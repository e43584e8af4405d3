"""`mlxft studio`: the security rules (Host, token, Origin, names, recipe paths), the pages and endpoints,
against a live server on 127.0.0.1 (uvicorn in a thread) over fabricated run folders.

The browser test (tests/integration/test_studio_browser.py) trains, stops, resumes and talks to a real tiny run.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.errors import ConfigError
from mlxft.recipes import load_recipe
from mlxft.studio import charts
from mlxft.studio.app import bind, server
from mlxft.studio.security import StudioError, check_name, child_folder
from report_fixtures import make_config, make_eval, make_metrics, write_run

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studio-runs")
    write_run(root, "tiny-a", config=make_config(lr=1e-3, finished=False), metrics=make_metrics(), eval_json=make_eval(),
              checkpoint_step=40)
    write_run(root, "tiny-b", config=make_config(lr=2e-3), metrics=make_metrics(overfit=False), eval_json=make_eval(False),
              checkpoint_step=40)
    return root


@pytest.fixture(scope="module")
def studio(runs_dir):
    sock = bind(0)
    srv, url = server(runs_dir, sock, token=TOKEN)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.started
    yield sock.getsockname()[1], url
    srv.should_exit = True
    thread.join(10)


def request(port, method, path, body=None, *, host=None, token=TOKEN, cookie=True, origin=None, stream=False):
    """(status, headers, body text) of one request; the right Host, cookie and token unless told otherwise."""
    headers = {"Host": host or f"127.0.0.1:{port}"}
    if cookie:
        headers["Cookie"] = f"mlxft_studio_{port}={TOKEN}"
    if token and method == "POST":
        headers["X-Mlxft-Token"] = token
    if origin:
        headers["Origin"] = origin
    data = json.dumps(body).encode() if body is not None else None
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, path, body=data, headers=headers)
    resp = conn.getresponse()
    if stream:
        return resp.status, dict(resp.getheaders()), resp  # caller reads (server-sent events never end)
    text = resp.read().decode()
    conn.close()
    return resp.status, dict(resp.getheaders()), text


def nothing_started(runs_dir: Path) -> bool:
    launches = runs_dir / ".studio" / "launches"
    runs = {p.name for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return (not launches.exists() or not any(launches.iterdir())) and runs == {"tiny-a", "tiny-b"}


# ---------------------------------------------------------------- security


def test_a_wrong_host_is_refused_for_pages_and_actions(studio, runs_dir):
    port, _ = studio
    for host in ("evil.example:%d" % port, "127.0.0.1.nip.io:%d" % port, "127.0.0.1:1", "localhost"):
        assert request(port, "GET", "/", host=host)[0] == 400
        status, _, text = request(port, "POST", "/api/launch", {"recipe": "smollm2-135m"}, host=host)
        assert status == 400 and "Host" in json.loads(text)["error"]
    assert request(port, "GET", "/", host=f"localhost:{port}")[0] == 200  # loopback names are fine
    assert nothing_started(runs_dir)


def test_actions_need_the_token_and_our_origin(studio, runs_dir):
    port, _ = studio
    body = {"recipe": "smollm2-135m"}
    for kw in ({"token": None}, {"token": "wrong"}, {"token": None, "cookie": False}):
        status, _, text = request(port, "POST", "/api/launch", body, **kw)
        assert status == 403 and "token" in json.loads(text)["error"]
    for path in ("/api/runs/tiny-a/resume", "/api/runs/tiny-a/stop", "/api/data/check", "/api/plan"):
        assert request(port, "POST", path, {}, token=None)[0] == 403
    status, _, text = request(port, "POST", "/api/launch", body, origin="http://evil.example")
    assert status == 403 and "cross-origin" in json.loads(text)["error"]
    assert nothing_started(runs_dir)


def test_pages_need_the_launch_url_once_then_a_cookie(studio):
    port, url = studio
    status, _, text = request(port, "GET", "/", cookie=False)
    assert status == 401 and "URL that `mlxft studio` printed" in text
    assert request(port, "GET", "/?token=wrong", cookie=False)[0] == 401
    status, headers, _ = request(port, "GET", "/?token=" + TOKEN, cookie=False)
    assert status == 303 and headers["location"] == "/"
    assert request(port, "GET", "//evil.example/?token=" + TOKEN, cookie=False)[1]["location"] == "/evil.example/"
    assert f"mlxft_studio_{port}={TOKEN}" in headers["set-cookie"] and "samesite=strict" in headers["set-cookie"].lower()
    assert url == f"http://127.0.0.1:{port}/?token={TOKEN}"
    _, headers, _ = request(port, "GET", "/")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


@pytest.mark.parametrize("path", ["/runs/..%2F..%2Fetc", "/runs/.studio", "/runs/tiny-a%2F..%2F..", "/runs/nope",
                                  "/launches/..%2Ftiny-a", "/runs/..%2F..%2Fetc/report", "/static/..%2Fapp.py",
                                  "/events/runs/..%2Ftiny-a"])
def test_traversal_names_are_refused(studio, path):
    port, _ = studio
    assert 400 <= request(port, "GET", path)[0] < 500


def test_traversal_and_non_recipe_paths_start_nothing(studio, runs_dir, tmp_path):
    port, _ = studio
    not_a_recipe = tmp_path / "notes.txt"
    not_a_recipe.write_text("name: x\n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: bad\ntrain: {iterz: 3}\n")
    cases = [
        ("/api/launch", {"recipe": "/etc/passwd"}, "is not a recipe"),
        ("/api/launch", {"recipe": "../../etc/passwd"}, "is not a recipe"),
        ("/api/launch", {"recipe": str(not_a_recipe)}, "is not a recipe"),
        ("/api/launch", {"recipe": str(tmp_path / "missing.yaml")}, "Recipe file not found"),
        ("/api/launch", {"recipe": str(bad_yaml)}, "unknown key"),
        ("/api/launch", {"recipe": "smollm2-135m", "tier": 7}, "tier must be one of"),
        ("/api/runs/..%2Ftiny-a/resume", {}, None),
        ("/api/runs/tiny-a/stop", {}, "no training process started by this studio"),
        ("/api/runs/tiny-b/resume", {}, "tiny-b is finished"),
        ("/api/data/check", {"dataset": "../recipes"}, "invalid dataset name"),
        ("/api/data/check", {"path": "/etc/passwd"}, "not a data file"),
        ("/api/playground/generate", {"runs": ["../tiny-a"], "model": "base"}, "invalid run name"),
    ]
    for path, body, message in cases:
        status, _, text = request(port, "POST", path, body)
        assert 400 <= status < 500, (path, body, status, text)
        if message:
            assert message in json.loads(text)["error"], (path, body, text)
    assert nothing_started(runs_dir)


def test_names_are_one_plain_path_segment(tmp_path):
    for bad in ("..", "../x", "a/b", ".hidden", "", "a" * 200, "x\x00y", "a..b"):
        with pytest.raises(StudioError):
            check_name(bad)
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path.parent)
    assert child_folder(tmp_path, "run") == tmp_path / "run"
    with pytest.raises(StudioError):
        child_folder(tmp_path, "link")  # a link out of the runs folder


# ---------------------------------------------------------------- pages and endpoints


def test_runs_page_lists_every_run_with_status_figures_and_eval(studio):
    port, _ = studio
    status, _, text = request(port, "GET", "/")
    assert status == 200
    for expected in ("tiny-a", "tiny-b", "status-failed-resumable", "commit-type", "pass"):
        assert expected in text
    assert 'data-live="/events/runs"' in text


def test_run_page_has_curves_card_eval_tables_and_resume(studio):
    port, _ = studio
    status, _, text = request(port, "GET", "/runs/tiny-a")
    assert status == 200
    for chart in ("loss", "throughput", "memory", "lr"):
        assert f'data-chart="{chart}"' in text
    assert 'id="run-card"' in text and "eval-table" in text and "confusion" in text
    assert 'id="resume-button"' in text  # failed-resumable: killed after a checkpoint
    assert request(port, "GET", "/runs/tiny-a/report")[2].count("data:image/png;base64") >= 3


def test_run_events_stream_the_live_part(studio):
    port, _ = studio
    status, headers, resp = request(port, "GET", "/events/runs/tiny-a", stream=True)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    line = resp.readline().decode()
    resp.close()
    assert line.startswith("data: ")
    assert 'data-chart=\\"loss\\"' in line


def test_plan_shows_the_cli_messages_and_the_memory_plan(studio, tiny_model, tiny_data, tmp_path):
    port, _ = studio
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"name: tiny\nmodel: {{source: {tiny_model}, family: llama}}\n"
                      f"lora: {{targets: [self_attn.q_proj], rank: 4, num_layers: 2}}\n"
                      f"train: {{iters: 5, batch_size: 4, max_seq_length: 64}}\ndata: {{path: {tiny_data}}}\n")
    overrides = ["train.iterz=3", "lora.rank=-1"]
    status, _, text = request(port, "POST", "/api/plan", {"recipe": str(recipe), "overrides": "\n".join(overrides)})
    with pytest.raises(ConfigError) as cli_error:
        load_recipe(str(recipe), overrides=overrides)
    assert status == 400 and json.loads(text)["error"] == str(cli_error.value)  # the CLI's words, all problems
    status, _, text = request(port, "POST", "/api/plan", {"recipe": str(recipe), "tier": 8})
    plan = json.loads(text)
    assert status == 200 and plan["fits"] and plan["peak_bytes"] > 0
    assert 'id="plan-peak"' in plan["html"] and "8 GB tier" in plan["html"]


def test_data_check_shows_findings_splits_and_lengths(studio, tiny_model, tmp_path):
    port, _ = studio
    data = tmp_path / "data"
    data.mkdir()
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (data / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n" + "{broken\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {{source: {tiny_model}, family: llama}}\nlora: {{targets: [self_attn.q_proj]}}\n")
    status, _, text = request(port, "POST", "/api/data/check", {"path": str(data), "recipe": str(recipe)})
    result = json.loads(text)
    assert status == 200 and not result["ok"] and result["errors"] >= 1
    assert f"{data / 'train.jsonl'}:3" in result["html"]  # file:line, as `mlxft data check` prints it
    assert 'id="data-splits"' in result["html"] and 'data-chart="lengths"' in result["html"]


def test_compare_page_shows_differences_curves_and_eval_deltas(studio):
    port, _ = studio
    status, _, text = request(port, "GET", "/compare?a=tiny-a&b=tiny-b")
    assert status == 200
    assert "recipe.train.learning_rate" in text and 'id="compare-evals"' in text
    assert text.count("<svg") >= 2 and 'data-chart="compare-loss"' in text


def test_other_pages_render(studio):
    port, _ = studio
    for path in ("/new", "/data", "/playground", "/compare"):
        status, _, text = request(port, "GET", path)
        assert status == 200 and "<main>" in text, path


def test_charts_count_their_points_and_say_when_empty():
    empty = charts.render(charts.Chart("loss", "Loss", "loss", [charts.Series("train", [], [])]))
    assert 'data-points="0"' in empty and "no points yet" in empty
    svg = charts.render(charts.Chart("loss", "Loss <b>", "loss", [charts.Series("train", [1, 2, 3], [3.0, float("nan"), 1.0])]))
    assert 'data-points="2"' in svg and "<polyline" in svg and "Loss &lt;b&gt;" in svg
    many = charts.render(charts.Chart("loss", "Loss", "loss", [charts.Series("train", list(range(5000)), [1.0] * 5000)]))
    assert 'data-points="5000"' in many and many.count(" ") < 2 * 5000  # thinned to MAX_DRAWN points drawn
    assert 'data-points="3"' in charts.bars("h", "lengths", [("0-8", 2), ("9-16", 0), (">16 (cut)", 1)])


def test_studio_command_says_when_the_port_is_taken(tmp_path):
    sock = bind(0)
    try:
        result = CliRunner().invoke(main, ["studio", "--runs-dir", str(tmp_path), "--port", str(sock.getsockname()[1])])
    finally:
        sock.close()
    assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output
