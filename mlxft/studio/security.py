"""The studio's guards: loopback Host/Origin only, a per-launch token, and names that cannot walk paths.

Every request must carry a Host header naming this server on loopback (127.0.0.1, localhost,
[::1] with our port): a page on another site that rebinds its DNS name to 127.0.0.1 sends its
own name and is refused (DNS rebinding). Pages need the launch token once (the URL that
`mlxft studio` prints), which becomes a same-site, HttpOnly cookie. A state-changing request
(POST) needs the token in the X-Mlxft-Token header, which only our own pages can read, and,
when the browser sends an Origin, our own origin: a form or fetch from another site is refused
before anything starts.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from urllib.parse import urlencode

from starlette.datastructures import QueryParams
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mlxft.errors import MlxftError

TOKEN_HEADER = "x-mlxft-token"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
# Run folders are `<recipe>-<timestamp>[-n]`; a launch id is `<timestamp>-<hex>`. One path segment, never "..".
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SAFE_METHODS = ("GET", "HEAD")


class StudioError(MlxftError):
    """A request the studio refuses; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def new_token() -> str:
    """A fresh secret for one launch of the studio."""
    return secrets.token_urlsafe(24)


def check_name(name: str, what: str = "run") -> str:
    """`name` if it is one plain path segment (letters, digits, . _ -; no '..'), else StudioError 400."""
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise StudioError(f"invalid {what} name {name!r}: one folder name of letters, digits, '.', '_', '-'")
    return name


def child_folder(root: Path, name: str, what: str = "run") -> Path:
    """root/name for a validated name that really is a direct child of root (no links out of it)."""
    path = root / check_name(name, what)
    if path.resolve().parent != root.resolve():
        raise StudioError(f"{what} {name!r} is not inside {root}")
    return path


def allowed_hosts(port: int) -> set[str]:
    return {f"{h}:{port}" for h in LOOPBACK_NAMES}


class Guard:
    """ASGI middleware applying the rules in the module docstring to every HTTP request."""

    def __init__(self, app: ASGIApp, token: str, port: int):
        self.app, self.token, self.port = app, token, port
        self.cookie = f"mlxft_studio_{port}"  # cookies are per host, not per port: one name per studio

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope) -> Response | None:
        """The response refusing this request, or None to let it through."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        if headers.get("host") not in allowed_hosts(self.port):
            return _refuse(400, f"unexpected Host header {headers.get('host')!r}: the studio answers on "
                                f"http://127.0.0.1:{self.port} only", path)
        if method not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and origin not in {f"http://{h}" for h in allowed_hosts(self.port)}:
                return _refuse(403, f"cross-origin request from {origin!r} refused", path)
            if not secrets.compare_digest(headers.get(TOKEN_HEADER, ""), self.token):
                return _refuse(403, "missing or wrong studio token (send the X-Mlxft-Token header our pages carry)",
                               path)
            return None
        if path.startswith("/static/"):
            return None  # our own CSS and JS: no secrets in them
        query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token")
        if given is not None and secrets.compare_digest(given, self.token):
            rest = [(k, v) for k, v in query.multi_items() if k != "token"]
            here = "/" + path.lstrip("/")  # never "//host": a same-site path only
            response = RedirectResponse(here + (f"?{urlencode(rest)}" if rest else ""), status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
            return response
        if not secrets.compare_digest(_cookie(headers.get("cookie", ""), self.cookie), self.token):
            return _refuse(401, "open the URL that `mlxft studio` printed (it carries this launch's token)", path)
        return None


def _cookie(header: str, name: str) -> str:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _refuse(status: int, message: str, path: str) -> Response:
    if path.startswith(("/api/", "/events/")):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(f"mlxft studio: {message}\n", status_code=status)


# Pages render only our own scripts and styles; reports carry inline CSS and data: images.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                 b"script-src 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
