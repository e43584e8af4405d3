"""`mlxft studio` in a real browser (Playwright driving Debian's Chromium) on the tiny test model.

One flow, as a user would: start a run from the New run page, watch its loss chart gain points,
close the tab (training goes on), stop it (checkpoint on disk, status interrupted), resume it to
the end, check a dataset, ask the base and two adapters in the playground, compare two runs.
Every chart on the way must render with a size and points. Set MLXFT_STUDIO_SCREENSHOT=PATH to
save the run page (the README's docs/studio-run.png is made this way).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from report_fixtures import make_eval
from tiny_run import train_tiny_run

playwright = pytest.importorskip("playwright.sync_api", reason="pip install '.[test]' installs playwright")

ITERS = 800  # ~15-30 s of tiny-model steps: long enough to watch, stop and resume
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    for name in (os.environ.get("MLXFT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("no Chromium found: `make test` installs Debian's chromium (apt-get install chromium)")
    pytest.skip("no Chromium on this machine (apt-get install chromium, or set MLXFT_CHROMIUM)")


@pytest.fixture
def studio(tmp_path, tiny_model, tiny_data):
    """A studio process over a runs folder holding one finished tiny run (with an eval.json to show)."""
    runs = tmp_path / "runs"
    done = train_tiny_run(tiny_model, tiny_data, runs, iters=40)
    (done / "eval.json").write_text(json.dumps(make_eval()))
    proc = subprocess.Popen([sys.executable, "-m", "mlxft.cli", "studio", "--runs-dir", str(runs), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=\S+", line)
    assert match, f"studio printed no URL: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
    yield {"url": match.group(0), "base": match.group(1), "runs": runs, "done": done}
    proc.terminate()
    proc.wait(10)
    for record in (runs / ".studio" / "launches").glob("*.json"):  # never leave a training process behind
        pid = json.loads(record.read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"mlxft" in cmdline.read_bytes():  # still ours, not a reused pid
            os.kill(pid, 9)


def points(page, chart: str = "loss") -> int:
    return int(page.get_attribute(f'svg[data-chart="{chart}"]', "data-points") or 0)


def assert_charts_render(page) -> int:
    """Every SVG chart on the page has a size and drawn points; returns how many there are."""
    seen = page.eval_on_selector_all("svg.chart", """els => els.map(e => ({
        chart: e.dataset.chart, points: +e.dataset.points, w: e.getBoundingClientRect().width,
        h: e.getBoundingClientRect().height, drawn: e.querySelectorAll("polyline, rect[height]").length}))""")
    bad = [c for c in seen if not (c["points"] > 0 and c["w"] > 0 and c["h"] > 0 and c["drawn"] > 0)]
    assert seen and not bad, f"charts that did not render: {bad}"
    return len(seen)


def test_start_watch_stop_resume_talk_and_compare_in_a_browser(studio, tmp_path, tiny_model, tiny_data):
    t0 = time.monotonic()
    timings = {}
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""name: tiny
model: {{source: {tiny_model}, family: llama}}
lora: {{targets: [self_attn.q_proj, self_attn.v_proj], rank: 4, alpha: 8, num_layers: 2}}
train: {{learning_rate: 3.0e-3, iters: {ITERS}, batch_size: 4, max_seq_length: 64, val_every: 100, val_batches: 1,
         report_every: 1, save_every: 400}}
data: {{path: {tiny_data}, system_prompt: Label the message.}}
""")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(studio["url"])
        assert page.locator("#runs-table").inner_text().count("finished") == 1

        # New run: a bad override shows the CLI's message inline; the plan shows before anything starts.
        page.goto(studio["base"] + "/new")
        page.fill("#recipe-path", str(recipe))
        page.fill("#overrides", "train.iterz=5")
        page.wait_for_selector("#recipe-errors:not([hidden])")
        assert "did you mean 'train.iters'" in page.inner_text("#recipe-errors")
        assert page.is_disabled("#start-button")
        page.fill("#overrides", "")
        page.wait_for_selector("#plan-peak")
        assert "yes" in page.inner_text("#plan-fits")
        assert not (studio["runs"] / ".studio").exists()  # planning started nothing
        page.click("#start-button")
        page.wait_for_url(re.compile(r".*/runs/tiny-[\d-]+$"), timeout=90_000)  # the launch page follows the run
        run_url = page.url
        run = studio["runs"] / run_url.rsplit("/", 1)[1]
        timings["started"] = time.monotonic() - t0

        # The loss chart gains points while it trains, with no reload.
        page.wait_for_function("() => +document.querySelector('svg[data-chart=loss]').dataset.points > 5")
        first = points(page)
        page.wait_for_function(f"() => +document.querySelector('svg[data-chart=loss]').dataset.points > {first + 20}")
        launch = json.loads(next((studio["runs"] / ".studio" / "launches").glob("*.json")).read_text())
        assert os.getsid(launch["pid"]) == launch["pid"]  # its own session: a closed browser or studio cannot stop it
        timings["watched"] = time.monotonic() - t0

        # Close the tab: training goes on; a new tab picks the live view up again.
        page.close()
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(run_url)
        again = points(page)
        assert again > first
        page.wait_for_function(f"() => +document.querySelector('svg[data-chart=loss]').dataset.points > {again}")
        assert_charts_render(page)

        # Stop = Ctrl-C: a checkpoint at the step it stopped, status interrupted.
        page.click("#stop-button")
        page.wait_for_function("() => document.querySelector('#run-status').textContent.trim() === 'interrupted'")
        events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
        stopped_at = events[-1]["step"]
        assert events[-1]["event"] == "interrupted" and 0 < stopped_at < ITERS
        assert (run / "checkpoints" / f"step-{stopped_at:06d}").is_dir()
        timings["stopped"] = time.monotonic() - t0

        # Resume to the end.
        page.click("#resume-button")
        page.wait_for_function("() => document.querySelector('#run-status').textContent.trim() === 'finished'",
                               timeout=150_000)
        assert page.inner_text("#steps-done") == f"{ITERS}/{ITERS}"
        assert points(page) >= ITERS
        assert assert_charts_render(page) >= 4
        timings["finished"] = time.monotonic() - t0
        if os.environ.get("MLXFT_STUDIO_SCREENSHOT"):
            page.screenshot(path=os.environ["MLXFT_STUDIO_SCREENSHOT"], full_page=False)
        assert "<img" in page.request.get(studio["base"] + f"/runs/{run.name}/report").text()

        # The finished fixture run: eval tables, confusion matrix, and the report's images all render.
        page.goto(studio["base"] + f"/runs/{studio['done'].name}")
        assert page.locator("table.eval-table").count() >= 1 and page.locator("table.confusion").count() >= 1
        page.goto(studio["base"] + f"/runs/{studio['done'].name}/report")
        images = page.eval_on_selector_all("img", "els => els.map(i => i.complete && i.naturalWidth > 0)")
        assert images and all(images)

        # Data: `mlxft data check` findings, split sizes and the token-length histogram.
        page.goto(studio["base"] + "/data")
        page.fill("#data-path", str(tiny_data))
        page.fill("#data-recipe-path", str(recipe))
        page.click("#check-button")
        page.wait_for_selector("#data-splits")
        assert "train" in page.inner_text("#data-splits") and "OK to train" in page.inner_text("#data-verdict")
        assert_charts_render(page)

        # Playground: base and two adapters answer side by side; the next-token view of one of them.
        page.goto(studio["base"] + f"/playground?run={run.name}&run={studio['done'].name}")
        page.fill("#prompt", "alpha x y")
        page.fill("input[name=max_tokens]", "6")
        page.click("#ask-button")
        page.wait_for_function("() => [...document.querySelectorAll('pre[data-reply]')].every(e => e.dataset.state === 'done')",
                               timeout=120_000)
        replies = {e.get_attribute("data-reply"): e.inner_text() for e in page.query_selector_all("pre[data-reply]")}
        assert set(replies) == {"base", run.name, studio["done"].name}
        assert all(text.strip() for text in replies.values()), replies
        page.click(f'button[data-action=probs][data-model="{run.name}"]')
        page.wait_for_selector("#probs-table")
        assert page.locator("#probs-table tr").count() > 5
        timings["playground"] = time.monotonic() - t0

        # Compare the two runs.
        page.goto(studio["base"] + f"/compare?a={studio['done'].name}&b={run.name}")
        assert "recipe.train.iters" in page.inner_text("#config-diffs")
        assert assert_charts_render(page) >= 2
        browser.close()
    timings["total"] = time.monotonic() - t0
    print("studio browser test timings (s):", {k: round(v, 1) for k, v in timings.items()})
