"""The studio's actions (POST /api/..., token-guarded) and live streams (GET /events/..., server-sent events).

Actions call what the CLI calls: load_recipe + plan_recipe (`mlxft plan`), the `mlxft train`
/ `--resume` / `mlxft fuse` commands themselves as processes, check_path (`mlxft data check`),
and `mlxft serve`'s engine for the playground. A mistake is one 4xx JSON {"error": message}.
"""

from __future__ import annotations

import asyncio
import json
import time
from itertools import chain
from pathlib import Path
from typing import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from mlxft.config import MEMORY_TIERS
from mlxft.data.check import check_path, histogram_counts, recipe_and_tokenizer
from mlxft.data.formats import DATA_SUFFIXES
from mlxft.recipes import list_recipes, load_recipe
from mlxft.runs.summary import status_hint, summarize
from mlxft.studio import charts
from mlxft.studio.pages import DATASETS_DIR, RESUMABLE, run_fragment, runs_fragment, studio_of
from mlxft.studio.security import StudioError, check_name
from mlxft.training.plan import format_plan, gb, plan_recipe

POLL_SECONDS = 0.5  # how often a live page's files are looked at
MAX_OVERRIDES = 64
SHOWN_PROBLEMS = 200


async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StudioError("the request body must be JSON") from None
    if not isinstance(body, dict):
        raise StudioError("the request body must be a JSON object")
    return body


# ---------------------------------------------------------------- new run: recipe, plan, launch


def recipe_arg(text) -> str:
    """A bundled recipe's name, or the absolute path of a .yaml/.yml file: nothing else reaches load_recipe."""
    if not isinstance(text, str) or not text.strip():
        raise StudioError("choose a recipe")
    text = text.strip()
    if text in list_recipes():
        return text
    if not text.endswith((".yaml", ".yml")):
        raise StudioError(f"{text!r} is not a recipe: give a bundled recipe name ({', '.join(list_recipes())}) "
                          "or the path of a recipe .yaml file")
    path = Path(text).expanduser().resolve()
    if not path.is_file():
        raise StudioError(f"Recipe file not found: {path}")
    return str(path)


def new_run_form(body: dict) -> tuple[str, int | None, list[str], bool]:
    """(recipe, tier, overrides, auto_fit) from the New run form, each checked."""
    tier = body.get("tier")
    if tier in ("", None):
        tier = None
    elif str(tier) not in {str(t) for t in MEMORY_TIERS}:
        raise StudioError(f"tier must be one of {', '.join(map(str, MEMORY_TIERS))} (GB), got {tier!r}")
    overrides = body.get("overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.splitlines()
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise StudioError("overrides must be lines of key=value")
    overrides = [o.strip() for o in overrides if o.strip()]
    if len(overrides) > MAX_OVERRIDES:
        raise StudioError(f"at most {MAX_OVERRIDES} overrides")
    return recipe_arg(body.get("recipe")), int(tier) if tier else None, overrides, bool(body.get("auto_fit"))


def _plan(studio, recipe: str, tier, overrides) -> dict:
    r = load_recipe(recipe, tier=tier, overrides=overrides)  # ConfigError: every problem, as the CLI prints them
    p = plan_recipe(r, None)
    html = studio.render("_plan.html", recipe=r, plan=p, text=format_plan(p), gb=gb)
    return {"ok": True, "fits": p.fits, "peak_bytes": p.peak_bytes, "budget_bytes": p.budget_bytes,
            "tokens_per_sec": p.tokens_per_sec, "html": html}


async def plan(request: Request) -> JSONResponse:
    studio = studio_of(request)
    recipe, tier, overrides, _ = new_run_form(await _body(request))
    return JSONResponse(await run_in_threadpool(_plan, studio, recipe, tier, overrides))


async def launch(request: Request) -> JSONResponse:
    """Start `mlxft train` for the form; the recipe is validated first, so a bad one starts nothing."""
    studio = studio_of(request)
    recipe, tier, overrides, auto_fit = new_run_form(await _body(request))
    await run_in_threadpool(load_recipe, recipe, tier, overrides)
    started = studio.launcher.train(recipe, tier, overrides, auto_fit)
    return JSONResponse({"launch": started.id, "pid": started.pid, "url": f"/launches/{started.id}?follow=1"})


async def stop(request: Request) -> JSONResponse:
    studio = studio_of(request)
    stopped = studio.launcher.stop(studio.run(request.path_params["name"]))
    return JSONResponse({"stopped": stopped.pid, "launch": stopped.id})


async def resume(request: Request) -> JSONResponse:
    """`mlxft train --resume RUN` for a run `mlxft runs` calls interrupted or failed-resumable (never a live one)."""
    studio = studio_of(request)
    run = studio.run(request.path_params["name"])
    status = (await run_in_threadpool(summarize, run)).status
    if status not in RESUMABLE:
        raise StudioError(f"{run.name} is {status}: {status_hint(status, run) or 'nothing to resume'}", 409)
    started = studio.launcher.resume(run.resolve())
    return JSONResponse({"launch": started.id, "pid": started.pid, "url": f"/runs/{request.path_params['name']}"})


async def fuse(request: Request) -> JSONResponse:
    studio = studio_of(request)
    started = studio.launcher.fuse(studio.run(request.path_params["name"]).resolve())
    return JSONResponse({"launch": started.id, "pid": started.pid, "url": f"/launches/{started.id}"})


# ---------------------------------------------------------------- data check


def dataset_path(body: dict) -> Path:
    """A bundled dataset by name, or a folder / data file (.jsonl .json .csv .tsv) the user points at."""
    if body.get("dataset"):
        path = DATASETS_DIR / check_name(body["dataset"], "dataset")
        if not path.is_dir():
            raise StudioError(f"no bundled dataset named {body['dataset']!r}", 404)
        return path
    text = body.get("path")
    if not isinstance(text, str) or not text.strip():
        raise StudioError("choose a bundled dataset or give a file or folder path")
    path = Path(text.strip()).expanduser().resolve()
    if not path.exists():
        raise StudioError(f"{path} does not exist", 404)
    if path.is_file() and path.suffix.lower() not in DATA_SUFFIXES:
        raise StudioError(f"{path.name} is not a data file ({', '.join(DATA_SUFFIXES)}) or a folder")
    return path


def _data_check(studio, path: Path, recipe: str) -> dict:
    r, tokenizer, why = recipe_and_tokenizer(recipe)
    report = check_path(path, r, tokenizer)
    lengths = [n for st in report.stats.values() for n in st.get("lengths", [])]
    histogram = charts.bars("lengths", f"Token lengths (max_seq_length {report.max_seq_length})",
                            histogram_counts(lengths, report.max_seq_length)) if lengths else None
    html = studio.render("_data_report.html", report=report, problems=report.problems[:SHOWN_PROBLEMS],
                         histogram=histogram, why=why, splits=_split_rows(report))
    return {"ok": report.ok, "errors": len(report.errors), "warnings": len(report.warnings), "html": html}


def _split_rows(report) -> list[tuple[str, dict]]:
    order = ("train", "valid", "test", "data")
    return sorted(report.stats.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)


async def data_check(request: Request) -> JSONResponse:
    studio = studio_of(request)
    body = await _body(request)
    path, recipe = dataset_path(body), recipe_arg(body.get("recipe") or "smollm2-135m")
    return JSONResponse(await run_in_threadpool(_data_check, studio, path, recipe))


# ---------------------------------------------------------------- playground


def _playground_runs(studio, body: dict) -> list[Path]:
    names = body.get("runs")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise StudioError("'runs' must be a list of run names")
    return [studio.run(n) for n in names]


async def playground_generate(request: Request) -> StreamingResponse:
    """The reply of one model (base or a run's adapter) to the prompt, streamed as plain text."""
    studio = studio_of(request)
    body = await _body(request)
    runs = _playground_runs(studio, body)
    job = await run_in_threadpool(studio.playground.start, runs, body)
    pieces = studio.playground.stream(job)
    first = await run_in_threadpool(next, pieces, "")  # an error before the first token is still a 4xx
    return StreamingResponse(chain([first], pieces), media_type="text/plain; charset=utf-8")


async def playground_probs(request: Request) -> JSONResponse:
    studio = studio_of(request)
    body = await _body(request)
    k = body.get("k", 5)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 20:
        raise StudioError("k (tokens shown per step) must be an integer from 1 to 20")
    result = await run_in_threadpool(studio.playground.next_tokens, _playground_runs(studio, body), body, k)
    result["html"] = studio.render("_probs.html", **result)
    return JSONResponse(result)


# ---------------------------------------------------------------- live streams


def _stat(path: Path) -> tuple:
    try:
        st = path.stat()
        return st.st_mtime_ns, st.st_size
    except OSError:
        return ()


def sse(signature: Callable[[], object], payload: Callable[[], dict]) -> StreamingResponse:
    """A server-sent event with payload() each time signature() changes (looked at every POLL_SECONDS)."""
    async def events():
        last, quiet = object(), 0.0
        while True:
            sig = await run_in_threadpool(signature)
            if sig != last:
                last, quiet = sig, 0.0
                try:
                    data = await run_in_threadpool(payload)
                except Exception as e:  # a half-written file: say so, try again on the next change
                    data = {"error": f"{type(e).__name__}: {e}"}
                yield f"data: {json.dumps(data)}\n\n"
            elif quiet >= 15:
                quiet = 0.0
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_SECONDS)
            quiet += POLL_SECONDS

    return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"})


def _clock() -> int:
    return int(time.time() // 30)  # "running" means metrics in the last two minutes: look again as time passes


async def runs_events(request: Request) -> StreamingResponse:
    studio = studio_of(request)

    def signature():
        runs = sorted(studio.runs_dir.iterdir()) if studio.runs_dir.is_dir() else []
        files = [(p.name, _stat(p / "config.json"), _stat(p / "metrics.jsonl"), _stat(p / "eval.json")) for p in runs]
        launches = [(x.id, x.run, studio.launcher.alive(x)) for x in studio.launcher.all()[:20]]
        return files, launches, _clock()

    return sse(signature, lambda: {"html": runs_fragment(studio)})


async def run_events(request: Request) -> StreamingResponse:
    studio = studio_of(request)
    run = studio.run(request.path_params["name"])

    def signature():
        launch = studio.launcher.for_run(run)
        log = (launch.id, _stat(Path(launch.log)), studio.launcher.alive(launch)) if launch else None
        files = [_stat(run / f) for f in ("config.json", "metrics.jsonl", "eval.json", "checkpoints")]
        return files, log, _clock()

    return sse(signature, lambda: {"html": run_fragment(studio, run)})


async def launch_events(request: Request) -> StreamingResponse:
    studio = studio_of(request)
    launch_id = request.path_params["launch_id"]
    studio.launcher.get(launch_id)  # 404 before the stream starts

    def payload():
        x = studio.launcher.get(launch_id)
        return {"log": studio.launcher.tail(x), "alive": studio.launcher.alive(x), "returncode": x.returncode,
                "run_url": f"/runs/{Path(x.run).name}" if x.run and (Path(x.run) / "config.json").is_file() else None}

    def signature():
        x = studio.launcher.get(launch_id)
        return _stat(Path(x.log)), studio.launcher.alive(x), x.run, x.returncode

    return sse(signature, payload)
