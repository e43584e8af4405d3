"""What stands between the network and `mlxft serve`'s models: the API key, the bind rule,
clients that leave, and the model's context.

    mlxft serve --api-key KEY ...            # or MLXFT_API_KEY=KEY; clients send Authorization: Bearer KEY
    mlxft serve --host 0.0.0.0 ...           # refused without a key (--insecure-no-auth to do it anyway)

The key is compared in constant time (sha256 of both sides, then hmac.compare_digest), so a
client cannot find it byte by byte from response times.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import select
import socket
from pathlib import Path

from mlxft.errors import ConfigError

API_KEY_ENV = "MLXFT_API_KEY"
# config.json keys that hold a model's context length, in the order model families use them.
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length", "n_ctx")


class ClientGone(Exception):
    """The client closed its connection: its generation is cancelled, nothing more is sent."""


def resolve_api_key(flag: str | None) -> str | None:
    """The key from --api-key, else $MLXFT_API_KEY; None when neither is set. An empty key is refused."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    if key is None:
        return None
    if not key.strip():
        raise ConfigError(f"the API key is empty (--api-key or ${API_KEY_ENV}); pass a real key or none")
    if any(c.isspace() or not c.isprintable() for c in key) or not key.isascii():
        raise ConfigError("the API key must be printable ASCII without spaces (it travels in an HTTP header)")
    return key


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere: treat it as reachable from outside


def check_bind(host: str, api_key: str | None, insecure: bool) -> str | None:
    """Refuse to listen beyond loopback without a key, unless `insecure`; returns a warning to print, if any."""
    if is_loopback(host) or api_key:
        return None
    if insecure:
        return (f"WARNING: listening on {host} with no API key (--insecure-no-auth): anyone who can reach this "
                "address can use the models")
    raise ConfigError(f"refusing to listen on {host} without an API key: anyone who can reach it could use the "
                      f"models. Pass --api-key KEY (or set ${API_KEY_ENV}), bind 127.0.0.1, or pass "
                      "--insecure-no-auth to serve without a key anyway")


def authorized(header: str | None, api_key: str) -> bool:
    """Whether an Authorization header carries `Bearer <api_key>` (constant-time comparison)."""
    scheme, _, token = (header or "").strip().partition(" ")
    given = hashlib.sha256(token.strip().encode("utf-8", "surrogateescape")).digest()
    wanted = hashlib.sha256(api_key.encode()).digest()
    return hmac.compare_digest(given, wanted) and scheme.lower() == "bearer"


def client_gone(connection: socket.socket) -> bool:
    """True when the client has closed its end (EOF or reset), without consuming anything it sent."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        if not readable:
            return False
        return connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


def model_context(model_dir: Path) -> int | None:
    """The context length a model folder's config.json declares (None when it declares none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in _CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
