"""`mlxft report RUN`: a self-contained report.html with run card, curves, eval tables and warnings.

Layout tests use fabricated run folders (tests/report_fixtures.py); one test reports on a real
tiny training run. The browser tests open the page in headless Chromium (Debian's `chromium`,
installed by `make test`) and read back, from the live DOM, that every image decoded.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxft.cli import main
from mlxft.errors import MlxftError
from mlxft.runs.report import inline_diff, write_report
from report_fixtures import make_config, make_eval, make_metrics, write_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """Images, tables (with their header cells) and external references of a page."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.tables: list[dict] = []
        self.external: list[str] = []
        self.scripts = 0
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "table":
            self.tables.append({"class": a.get("class", ""), "id": a.get("id"), "headers": [], "text": ""})
        if tag == "th":
            self._in_th = True
        if tag in ("script", "link", "iframe", "object"):
            self.scripts += 1
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag == "th":
            self._in_th = False

    def handle_data(self, data):
        if self.tables:
            self.tables[-1]["text"] += data
            if self._in_th and data.strip():
                self.tables[-1]["headers"].append(data.strip())


def parse(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text())
    return p


def decode_png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,")
    return base64.b64decode(src.split(",", 1)[1], validate=True)


@pytest.fixture
def fake_run(tmp_path) -> Path:
    return write_run(tmp_path, "tiny-20261123-120000", metrics=make_metrics(preference=True), eval_json=make_eval(passed=False))


# ---------------------------------------------------------------- layout


def test_report_is_self_contained_with_card_curves_and_eval_tables(fake_run):
    out = write_report(fake_run)
    assert out == fake_run / "report.html"
    assert not [p for p in fake_run.iterdir() if p.name.startswith(".report")]  # no temp file left
    page = parse(out)
    assert page.external == [] and page.scripts == 0  # opens offline, nothing to fetch or run
    # loss, throughput, memory, learning rate, preference curves: real PNGs with pixels
    assert [i["alt"] for i in page.images] == [
        "Loss (train and validation)", "Tokens per second", "Peak memory", "Learning rate",
        "Preference tuning: reward margin and accuracy",
    ]
    for img in page.images:
        png = decode_png(img["src"])
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
    text = out.read_text()
    card = next(t for t in page.tables if t["id"] == "run-card")["text"]
    for expected in ("seed", "1234", "mlx 0.32.4", "mlx-lm 0.32.2", "mlxft 0.1.0", "a" * 64, "c" * 64,
                     "Test CPU 9000", "cpu_count: 2", "builtin:smollm2-135m-instruct [float32]", "Label the commit."):
        assert expected in card, expected
    assert "sft, lora" in card
    config = next(t for t in page.tables if t["id"] == "resolved-config")["text"]
    assert "train.learning_rate" in config and "lora.rank" in config
    # eval tables: every "values" entry is a column, then delta and gate
    evals = [t for t in page.tables if t["class"] == "eval-table"]
    assert len(evals) == 2
    assert evals[0]["headers"] == ["scorer", "base", "base 3-shot", "adapter", "delta", "gate", "result"]
    assert "86.2%" in evals[0]["text"] and "31.0%" in evals[0]["text"] and "+86.2 pts" in evals[0]["text"]
    assert "pass" in evals[0]["text"] and "FAIL" in evals[1]["text"] and "+1.50" in evals[1]["text"]
    confusion = [t for t in page.tables if t["class"] == "confusion"]
    assert len(confusion) == 2 and confusion[0]["headers"] == ["feat", "fix", "(other)", "feat", "fix"]
    failures = next(t for t in page.tables if t["class"] == "failures")["text"]
    assert "add <script>alert(1)</script> guard" in failures  # shown as text ...
    assert "<script>alert(1)" not in text  # ... never as markup
    assert 'id="overfitting-warning"' in text and "validation loss rose from 2.100 (step 10) to 3.000 (step 40)" in text
    assert "FAILED" in text  # eval gates did not all pass
    assert "prompt: system default, few shot 0, max tokens 8" in text
    assert "gates pass</span></h3>" in text and "gate FAILED</span></h3>" in text  # per suite


def test_overfitting_warning_is_computed_from_the_curves_without_the_event(tmp_path):
    metrics = [m for m in make_metrics(overfit=True) if "event" not in m]
    page = write_report(write_run(tmp_path, "r", metrics=metrics)).read_text()
    assert 'id="overfitting-warning"' in page and "training loss fell from" in page
    assert "overfitting alarm" not in page  # that sentence is for the logged event only


def test_no_overfitting_warning_when_validation_keeps_falling(tmp_path):
    page = write_report(write_run(tmp_path, "r", metrics=make_metrics(overfit=False))).read_text()
    assert "overfitting-warning" not in page
    assert 'id="no-eval"' in page  # no eval.json yet: says how to make one
    assert "Preference tuning" not in page  # not a preference run: no such plot


def test_version_1_eval_json_still_gets_a_table(tmp_path):
    old = {"split": "test", "n": 12, "scorer": "exact_match", "base": 0.25, "adapter": 0.75, "delta": 0.5,
           "examples": [{"reference": "alpha", "base": "x", "adapter": "beta"}, {"reference": "a", "base": "a", "adapter": "a"}]}
    run = write_run(tmp_path, "r", metrics=make_metrics(), eval_json=old)
    page = parse(write_report(run))
    table = next(t for t in page.tables if t["class"] == "eval-table")
    assert "25.0%" in table["text"] and "75.0%" in table["text"] and "+50.0 pts" in table["text"]
    assert "beta" in next(t for t in page.tables if t["class"] == "failures")["text"]


def test_a_minimal_eval_json_renders_and_a_malformed_one_is_named(tmp_path):
    minimal = {"suites": {"s": {"scorers": [{"name": "regex", "values": {"adapter": 0.5}}],
                                "failures": [{"adapter": "x", "base": "\n\n"}]}}}
    run = write_run(tmp_path, "r", metrics=make_metrics(), eval_json=minimal)
    table = next(t for t in parse(write_report(run)).tables if t["class"] == "eval-table")
    assert table["headers"] == ["scorer", "base", "adapter", "delta", "gate", "result"] and "0.500" in table["text"]
    assert "&#34;\\n\\n&#34;" in (run / "report.html").read_text()  # whitespace-only output made visible
    (run / "eval.json").write_text(json.dumps({"suites": {"s": {"scorers": [{"name": "regex"}]}}}))
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 1 and "suites.s.scorers[0] needs a 'name' and a 'values' object" in res.output
    (run / "eval.json").write_text(json.dumps({"suites": {"s": {"scorers": [{"name": "r", "values": {"base": "high"}}]}}}))
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 1 and "values and delta must be numbers or null (not: base)" in res.output


def test_an_interrupted_run_says_how_to_resume(tmp_path):
    metrics = make_metrics(steps=20, overfit=False) + [{"step": 20, "event": "interrupted"}]
    run = write_run(tmp_path, "r", config=make_config(finished=False), metrics=metrics, checkpoint_step=20)
    page = write_report(run).read_text()
    assert ">interrupted</span>" in page and f"continue with: mlxft train --resume {run}" in page


def test_inline_diff_marks_missing_and_extra_words_and_escapes():
    assert str(inline_diff("fix the <b> parser", "fix a <b> parser")) == (
        "fix <del>the</del><ins>a</ins> &lt;b&gt; parser"
    )


@pytest.mark.parametrize("case", ["missing", "not-a-run", "no-metrics", "bad-metrics-line", "bad-eval"])
def test_bad_input_gets_one_clear_message_and_exit_1(tmp_path, case):
    if case == "missing":
        target, expected = tmp_path / "nope", "does not exist"
    elif case == "not-a-run":
        (tmp_path / "plain").mkdir()
        target, expected = tmp_path / "plain", "is not an mlxft run folder (no config.json)"
    elif case == "no-metrics":
        target, expected = write_run(tmp_path, "r", metrics=None), "has no training metrics yet"
    elif case == "bad-metrics-line":
        target = write_run(tmp_path, "r", metrics=make_metrics())
        lines = (target / "metrics.jsonl").read_text().splitlines()
        lines.insert(2, "{oops")
        (target / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        expected = "metrics.jsonl:3: not a JSON object"
    else:
        target = write_run(tmp_path, "r", metrics=make_metrics())
        (target / "eval.json").write_text("[1, 2]")
        expected = "eval.json is not a JSON object"
    res = CliRunner().invoke(main, ["report", str(target)])
    assert res.exit_code == 1, res.output
    assert expected in res.output and "Traceback" not in res.output
    assert not (Path(target) / "report.html").exists()


def test_a_half_written_last_metrics_line_is_skipped(tmp_path):
    run = write_run(tmp_path, "r", metrics=make_metrics())
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 45, "train_lo')  # killed mid-write
    assert (run / "report.html").exists() is False
    assert write_report(run).is_file()


def test_a_failed_render_keeps_the_previous_report(tmp_path):
    run = write_run(tmp_path, "r", metrics=make_metrics())
    write_report(run)
    before = (run / "report.html").read_text()
    (run / "eval.json").write_text("{not json")
    with pytest.raises(MlxftError):
        write_report(run)
    assert (run / "report.html").read_text() == before


# ---------------------------------------------------------------- a real browser


def chromium() -> str:
    """Debian's chromium (make test installs it); outside CI a machine without one skips these tests."""
    for name in (os.environ.get("MLXFT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("no Chromium found: `make test` installs Debian's chromium (apt-get install chromium)")
    pytest.skip("no Chromium on this machine (apt-get install chromium, or set MLXFT_CHROMIUM)")


# Runs in the page after every image has loaded or failed; the verdict goes into the DOM that
# --dump-dom prints. Added to a copy of the report: the report itself carries no script.
PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}));
  const tables = [...document.querySelectorAll("table")].map(t => ({cls: t.className, id: t.id, rows: t.rows.length}));
  const fetched = performance.getEntriesByType("resource").map(r => r.name);
  document.body.setAttribute("data-probe", JSON.stringify({images, tables, fetched}));
});
</script>"""


def open_in_chromium(report: Path, work: Path) -> dict:
    """Load `report` in headless Chromium; return what the page saw: images, tables, fetched resources."""
    browser = chromium()
    page = work / "probe.html"
    page.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={work / 'chromium-profile'}", "--virtual-time-budget=10000",
           "--dump-dom", page.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'data-probe="([^"]*)"', res.stdout)
    assert m, f"Chromium printed no probe result (exit {res.returncode}): {res.stderr[-2000:]}"
    return json.loads(html.unescape(m.group(1)))


def assert_renders(seen: dict, n_images: int, n_eval_tables: int) -> None:
    broken = [i["alt"] for i in seen["images"] if not (i["complete"] and i["w"] > 0 and i["h"] > 0)]
    assert not broken, f"images that did not load in Chromium: {broken}"
    assert len(seen["images"]) == n_images
    assert sum(t["cls"] == "eval-table" and t["rows"] >= 2 for t in seen["tables"]) == n_eval_tables
    assert any(t["id"] == "run-card" and t["rows"] >= 10 for t in seen["tables"])
    assert seen["fetched"] == []  # nothing loaded from outside the file


def test_report_renders_in_headless_chromium_and_a_broken_image_is_caught(fake_run, tmp_path):
    report = write_report(fake_run)
    seen = open_in_chromium(report, tmp_path)
    assert_renders(seen, n_images=5, n_eval_tables=2)
    assert all(i["w"] >= 300 for i in seen["images"])
    # The check can fail: one corrupted image (its PNG signature overwritten) must be reported.
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace("base64,iVBORw0KGgo", "base64,AAAAAAAAAAA", 1))
    seen = open_in_chromium(broken, tmp_path)
    with pytest.raises(AssertionError, match=r"did not load in Chromium: \['Loss \(train and validation\)'\]"):
        assert_renders(seen, n_images=5, n_eval_tables=2)


# ---------------------------------------------------------------- a real training run


def test_report_on_a_real_tiny_training_run(tiny_model, tiny_data, tmp_path):
    from mlxft.config import DataConfig, LoraConfig, ModelConfig, Recipe, TrainConfig
    from mlxft.training.setup import train

    from conftest import SYSTEM

    recipe = Recipe(
        name="tiny",
        model=ModelConfig(source=str(tiny_model), family="llama"),
        lora=LoraConfig(targets=["self_attn.q_proj", "self_attn.v_proj"], rank=4, alpha=8, num_layers=2),
        train=TrainConfig(learning_rate=3e-3, iters=20, batch_size=8, max_seq_length=64, val_every=5, val_batches=2,
                          report_every=5, seed=7),
        data=DataConfig(path=str(tiny_data), system_prompt=SYSTEM),
    )
    run = train(recipe, runs_root=tmp_path / "runs", log=lambda *_: None).run.root
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    report = run / "report.html"
    assert f"wrote {report}" in res.output
    page = parse(report)
    assert [i["alt"] for i in page.images] == ["Loss (train and validation)", "Tokens per second", "Peak memory",
                                              "Learning rate"]
    card = next(t for t in page.tables if t["id"] == "run-card")["text"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["chat_template_sha256"] in card and cfg["data"]["sha256"]["train"] in card
    assert cfg["machine"]["chip"] in card and f"cpu_count: {os.cpu_count()}" in card
    assert "seed7" in re.sub(r"\s+", "", card) and f"mlx {cfg['versions']['mlx']}" in card
    assert_renders(open_in_chromium(report, tmp_path), n_images=4, n_eval_tables=0)
