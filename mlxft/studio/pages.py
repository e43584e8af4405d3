"""The studio's pages: runs, a run, new run, launch log, data, playground, compare (GET, read-only).

Each page reads runs through mlxft/runs/summary.py, mlxft/runs/report.py and mlxft/runs/compare.py,
the functions behind `mlxft runs`, `mlxft report` and `mlxft runs compare`.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from mlxft.config import MEMORY_TIERS
from mlxft.recipes import RECIPES_DIR, detect_tier, list_recipes
from mlxft.runs.compare import config_differences, eval_deltas, score_cell
from mlxft.runs.report import eval_tables, render_report, run_card
from mlxft.runs.run import RunDir
from mlxft.runs.summary import (
    RunSummary, list_runs, open_run, read_config, read_eval, read_metrics, status_hint, summarize,
)
from mlxft.studio import charts
from mlxft.studio.security import NAME_RE, StudioError

DATASETS_DIR = RECIPES_DIR.parent / "datasets"  # the bundled datasets, beside the bundled recipes
RESUMABLE = ("interrupted", "failed-resumable")


def studio_of(request: Request):
    return request.app.state.studio


# ---------------------------------------------------------------- runs


def runs_rows(studio) -> list:
    """`mlxft runs`' rows: RunSummary per run, (path, problem) for a folder that cannot be read."""
    return list_runs(studio.runs_dir) if studio.runs_dir.is_dir() else []


def runs_fragment(studio) -> str:
    """The live part of the runs page: the runs table and the launches that have no run folder yet."""
    launches = studio.launcher.all()
    pending = [(x, studio.launcher.alive(x)) for x in launches if not x.run]
    rows = [(r, None) if isinstance(r, RunSummary) else (None, r) for r in runs_rows(studio)]
    return studio.render("_runs_table.html", rows=rows, pending=pending[:10])


def runs_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    return studio.page("runs.html", title="Runs", fragment=runs_fragment(studio))


# ---------------------------------------------------------------- one run


def run_live(studio, run: Path) -> dict:
    """What changes while a run trains: key figures, status, charts, controls, the log of its launch."""
    summary = summarize(run)
    metrics = read_metrics(RunDir(run))
    launch = studio.launcher.for_run(run)
    alive = bool(launch and studio.launcher.alive(launch))
    return {
        "s": summary,
        "hint": status_hint(summary.status, run),
        "charts": [charts.render(c) for c in charts.run_charts(metrics)],
        "launch": launch,
        "alive": alive,
        "can_stop": alive and launch.kind in ("train", "resume") and summary.status != "finished",
        "has_adapter": (RunDir(run).best_adapters / "adapters.safetensors").is_file(),
        "can_resume": not alive and summary.status in RESUMABLE,
        "log": studio.launcher.tail(launch) if launch else None,
    }


def run_fragment(studio, run: Path) -> str:
    return studio.render("_run_live.html", name=run.name, **run_live(studio, run))


def run_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    run = studio.run(request.path_params["name"])
    cfg = read_config(open_run(run))
    return studio.page(
        "run.html", title=run.name, name=run.name, fragment=run_fragment(studio, run),
        card=run_card(cfg, run), suites=eval_tables(read_eval(RunDir(run))), summary=summarize(run),
    )


def report_page(request: Request) -> HTMLResponse:
    """`mlxft report`'s page, rendered for the browser (RUN/report.html is not rewritten)."""
    studio = studio_of(request)
    return HTMLResponse(render_report(studio.run(request.path_params["name"])))


def adapter_zip(request: Request) -> Response:
    """The run's adapter (the best one when validation chose one): what `mlxft serve` or mlx-lm loads."""
    studio = studio_of(request)
    run = RunDir(studio.run(request.path_params["name"]))
    folder = run.best_adapters
    files = [folder / "adapters.safetensors", folder / "adapter_config.json"]
    if not all(f.is_file() for f in files):
        raise StudioError(f"{run.root.name} has no adapter yet", 404)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, f"{run.root.name}-adapters/{f.name}")
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{run.root.name}-adapters.zip"'})


# ---------------------------------------------------------------- new run, launches


def new_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    return studio.page("new.html", title="New run", recipes=list_recipes(), tiers=MEMORY_TIERS,
                       detected=detect_tier())


def launch_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    launch = studio.launcher.get(request.path_params["launch_id"])
    return studio.page("launch.html", title=f"Launch {launch.id}", launch=launch, alive=studio.launcher.alive(launch),
                       log=studio.launcher.tail(launch), run_name=Path(launch.run).name if launch.run else None,
                       request_follow=request.query_params.get("follow") == "1")


# ---------------------------------------------------------------- data


def bundled_datasets() -> list[str]:
    """Folder names under datasets/ (the ones recipes point at)."""
    if not DATASETS_DIR.is_dir():
        return []
    return sorted(p.name for p in DATASETS_DIR.iterdir() if p.is_dir() and NAME_RE.match(p.name))


def data_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    return studio.page("data.html", title="Data", datasets=bundled_datasets(), recipes=list_recipes())


# ---------------------------------------------------------------- playground, compare


def finished_runs(studio) -> list[RunSummary]:
    """Runs with an adapter on disk, newest first: what the playground and compare pages offer."""
    rows = [r for r in runs_rows(studio) if isinstance(r, RunSummary)]
    return [r for r in reversed(rows) if (RunDir(r.path).best_adapters / "adapters.safetensors").is_file()]


def playground_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    chosen = [studio.run(n) for n in request.query_params.getlist("run") if n][:2]
    prompts = studio.playground.system_prompts(chosen) if chosen else {}
    return studio.page("playground.html", title="Playground", runs=finished_runs(studio),
                       chosen=[r.name for r in chosen], prompts=prompts)


def compare_page(request: Request) -> HTMLResponse:
    studio = studio_of(request)
    every = [r for r in runs_rows(studio) if isinstance(r, RunSummary)]
    a, b = request.query_params.get("a"), request.query_params.get("b")
    context = {"title": "Compare", "runs": list(reversed(every)), "a": a, "b": b, "result": None}
    if a and b:
        context["result"] = compare(studio.run(a), studio.run(b))
    return studio.page("compare.html", **context)


def compare(path_a: Path, path_b: Path) -> dict:
    """`mlxft runs compare A B` as page data: config differences, figures, overlaid curves, eval deltas."""
    sa, sb = summarize(path_a), summarize(path_b)
    ma, mb = read_metrics(RunDir(path_a)), read_metrics(RunDir(path_b))
    diffs = [(k, _short(va), _short(vb)) for k, va, vb in
             config_differences(read_config(open_run(path_a)), read_config(open_run(path_b)))]
    curves = [charts.overlay("compare-loss", "Train loss", "loss",
                             [(f"A {sa.name}", *ma.series("train_loss")), (f"B {sb.name}", *mb.series("train_loss"))])]
    if ma.val or mb.val:
        curves.append(charts.overlay("compare-val", "Validation loss", "loss", [
            (f"{tag} {s.name}", [v["step"] for v in m.val], [v["val_loss"] for v in m.val])
            for tag, s, m in (("A", sa, ma), ("B", sb, mb))]))
        for c in curves[1:]:
            for series in c.series:
                series.markers = True
    if ma.has("tokens_per_sec") or mb.has("tokens_per_sec"):
        curves.append(charts.overlay("compare-throughput", "Tokens per second", "tokens / s", [
            (f"A {sa.name}", *ma.series("tokens_per_sec")), (f"B {sb.name}", *mb.series("tokens_per_sec"))]))
    deltas = [{**d, "a_text": score_cell(d["a"], d["unit"]), "b_text": score_cell(d["b"], d["unit"])}
              for d in eval_deltas(read_eval(RunDir(path_a)), read_eval(RunDir(path_b)))]
    return {"A": sa, "B": sb, "diffs": diffs, "charts": [charts.render(c) for c in curves], "evals": deltas}


def _short(v, width: int = 90) -> str:
    text = v if isinstance(v, str) else json.dumps(v)
    return text if len(text) <= width else text[: width - 3] + "..."
