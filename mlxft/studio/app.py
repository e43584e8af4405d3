"""The studio's web application: routes, templates, errors, and the server that runs it.

    mlxft studio [--runs-dir runs] [--port 8321]

Starlette (a small, well-kept ASGI toolkit: routing, streaming responses for server-sent
events, static files) served by uvicorn; pages are jinja2 templates (already the report's
engine); charts are SVG drawn on the server (charts.py); the only script is our own
static/studio.js. Nothing is fetched from the network. Every page and endpoint calls the
library functions the CLI calls; typed errors become one message (JSON 4xx for /api).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mlxft.errors import MlxftError
from mlxft.runs.summary import fmt_delta, fmt_num, fmt_score, gates_text, headline_text
from mlxft.studio import api, pages
from mlxft.studio.launches import Launcher
from mlxft.studio.playground import Playground
from mlxft.studio.security import Guard, StudioError, child_folder, new_token

HERE = Path(__file__).parent


@dataclass
class Studio:
    """What every request handler needs: the runs folder, this launch's token, launches, the playground."""

    runs_dir: Path
    token: str
    launcher: Launcher
    playground: Playground = field(default_factory=Playground)
    templates: jinja2.Environment = field(default_factory=lambda: _environment())

    def run(self, name: str) -> Path:
        """The run folder RUNS/name (validated name, a direct child, has config.json), else a 404."""
        path = child_folder(self.runs_dir, name)
        if not (path / "config.json").is_file():
            raise StudioError(f"no run named {name!r} in {self.runs_dir}", 404)
        return path

    def render(self, template: str, **context) -> str:
        return self.templates.get_template(template).render(token=self.token, runs_dir=self.runs_dir, **context)

    def page(self, template: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(self.render(template, **context), status_code=status)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        # studio pages first; mlxft/templates gives the eval tables the report shows too
        loader=jinja2.FileSystemLoader([HERE / "templates", HERE.parent / "templates"]),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(fmt_num=fmt_num, fmt_score=fmt_score, fmt_delta=fmt_delta, headline_text=headline_text,
                       gates_text=gates_text)
    return env


async def _mlxft_error(request: Request, exc: MlxftError) -> Response:
    """A user mistake: one clear message with a 4xx status (JSON for the API, a page otherwise)."""
    status = exc.status if isinstance(exc, StudioError) else 400
    if request.url.path.startswith(("/api/", "/events/")):
        return JSONResponse({"error": str(exc)}, status_code=status)
    studio: Studio = request.app.state.studio
    return studio.page("error.html", status=status, title="Error", message=str(exc))


def make_app(runs_dir: Path, port: int, token: str | None = None) -> Starlette:
    """The studio for `runs_dir`, answering as 127.0.0.1:`port` (the Host header it accepts)."""
    runs_dir = Path(runs_dir).resolve()
    studio = Studio(runs_dir, token or new_token(), Launcher(runs_dir))
    routes = [
        Route("/", pages.runs_page),
        Route("/runs/{name}", pages.run_page),
        Route("/runs/{name}/report", pages.report_page),
        Route("/runs/{name}/adapters.zip", pages.adapter_zip),
        Route("/new", pages.new_page),
        Route("/launches/{launch_id}", pages.launch_page),
        Route("/data", pages.data_page),
        Route("/playground", pages.playground_page),
        Route("/compare", pages.compare_page),
        Route("/events/runs", api.runs_events),
        Route("/events/runs/{name}", api.run_events),
        Route("/events/launches/{launch_id}", api.launch_events),
        Route("/api/plan", api.plan, methods=["POST"]),
        Route("/api/launch", api.launch, methods=["POST"]),
        Route("/api/runs/{name}/stop", api.stop, methods=["POST"]),
        Route("/api/runs/{name}/resume", api.resume, methods=["POST"]),
        Route("/api/runs/{name}/fuse", api.fuse, methods=["POST"]),
        Route("/api/data/check", api.data_check, methods=["POST"]),
        Route("/api/playground/generate", api.playground_generate, methods=["POST"]),
        Route("/api/playground/probs", api.playground_probs, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={MlxftError: _mlxft_error})
    app.state.studio = studio
    app.add_middleware(Guard, token=studio.token, port=port)
    return app


def bind(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1:port (0 = any free port); loopback only, by design."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as e:
        sock.close()
        raise MlxftError(f"cannot listen on 127.0.0.1:{port}: {e.strerror} (pick another --port)") from None
    sock.listen(64)
    return sock


def server(runs_dir: Path, sock: socket.socket, token: str | None = None) -> tuple[uvicorn.Server, str]:
    """A uvicorn server for the studio on `sock`, and the URL (with the token) to open."""
    port = sock.getsockname()[1]
    app = make_app(runs_dir, port, token)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off", proxy_headers=False)
    return uvicorn.Server(config), f"http://127.0.0.1:{port}/?token={app.state.studio.token}"


def serve(runs_dir: Path, port: int, log=print) -> None:
    """`mlxft studio`: create the runs folder if needed, print the URL, serve until Ctrl-C."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    sock = bind(port)
    srv, url = server(runs_dir, sock)
    log(f"mlxft studio on {url}")
    log(f"runs folder: {runs_dir.resolve()}  (training started here keeps running when the studio stops)")
    srv.run(sockets=[sock])
