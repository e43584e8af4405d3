"""The property every fuzz target holds, and the counting `make bench` reports.

An entry point given hostile input must give a valid result or a clear typed error
(`MlxftError`, or the server's 4xx); never another exception (a traceback), a hang, or a
modified input file. `probe` runs one case and says which it was; `Tally` counts cases per
entry point (hand-written and fuzzed), tracebacks, modified inputs and hangs.

Used by tests/test_fuzz_*.py (a fixed, small example budget, derandomised so CI is
reproducible) and bench/fuzz_bench.py (a longer random run that prints the counts table).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import string
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mlxft.errors import MlxftError

OUTCOMES = ("ok", "refused", "traceback", "modified", "hang")
HANG_SECONDS = 20.0  # one case taking longer than this on a 2-core box is a hang, not slowness


def suite_settings(max_examples: int) -> settings:
    """The test suite's budget: fixed examples, reproducible, no time deadline (the box is shared)."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


class Hang(BaseException):
    """Raised by the alarm: a BaseException so an `except Exception` in the code under test cannot swallow it."""


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise Hang in this (main) thread after `seconds`."""
    def ring(*_):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def digest(paths) -> dict[str, str]:
    """sha256 of every file under the given paths (files or folders), to tell a modified input."""
    out = {}
    for root in map(Path, paths):
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    kind: str  # one of OUTCOMES
    detail: str = ""

    @property
    def holds(self) -> bool:
        return self.kind in ("ok", "refused")


def probe(call: Callable[[], object], inputs=(), typed=(MlxftError,), seconds: float = HANG_SECONDS) -> Outcome:
    """Run `call` on hostile input: ok, refused (a typed error), traceback, modified (an input file
    changed) or hang (over `seconds`)."""
    before = digest(inputs)
    try:
        with alarm(seconds):
            call()
        kind, detail = "ok", ""
    except typed as e:
        kind, detail = "refused", str(e)[:200]
    except Hang:
        kind, detail = "hang", f"over {seconds:g} s"
    except Exception:  # noqa: BLE001 - this is what we count
        kind, detail = "traceback", traceback.format_exc(limit=-6)
    if kind != "hang" and digest(inputs) != before:
        return Outcome("modified", f"an input file changed ({kind} otherwise)")
    return Outcome(kind, detail)


@dataclass
class Tally:
    """Per entry point: cases tried (hand-written, fuzzed) and how many broke the property."""

    rows: dict[str, dict] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)

    def add(self, entry: str, outcome: Outcome, fuzzed: bool, case=None) -> None:
        row = self.rows.setdefault(entry, {"hand": 0, "fuzzed": 0, **{k: 0 for k in OUTCOMES}})
        row["fuzzed" if fuzzed else "hand"] += 1
        row[outcome.kind] += 1
        if not outcome.holds:
            self.failures.setdefault(entry, []).append(f"{outcome.kind}: {outcome.detail}\ncase: {repr(case)[:600]}")

    def table(self) -> str:
        head = "| entry point | cases (hand-written + fuzzed) | valid results / typed errors | tracebacks | inputs modified | hangs |"
        lines = [head, "|---|---|---|---|---|---|"]
        for entry, r in self.rows.items():
            lines.append(f"| {entry} | {r['hand'] + r['fuzzed']} ({r['hand']} + {r['fuzzed']}) | {r['ok']} / "
                         f"{r['refused']} | {r['traceback']} | {r['modified']} | {r['hang']} |")
        return "\n".join(lines)


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory(prefix="mlxft-fuzz-") as d:
        yield Path(d)


# ---------------------------------------------------------------- shared strategies

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=40) | st.sampled_from(["", " ", "\x00", "\u202e", "a" * 300, "{{ x }}", "{% for %}"]))


def json_values(keys=(), max_leaves: int = 20):
    """Any JSON value; objects draw their keys from `keys` (the ones the parser looks for) or anything."""
    key = st.sampled_from(list(keys)) | st.text(max_size=12) if keys else st.text(max_size=12)
    return st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(key, inner, max_size=6),
                        max_leaves=max_leaves)


def mutate(data: bytes):
    """A strategy of `data` damaged: cut, a byte flipped or inserted, a span deleted or repeated."""
    n = max(len(data), 1)

    def apply(ops):
        out = bytearray(data)
        for op, pos, byte in ops:
            pos = pos % (len(out) + 1)
            if op == 0:
                del out[pos:]
            elif op == 1 and out:
                out[pos % len(out)] ^= 1 << (byte % 8)
            elif op == 2:
                out[pos:pos] = bytes([byte])
            elif op == 3:
                del out[pos:pos + byte]
            else:
                out[pos:pos] = out[pos:pos + byte] * 3
        return bytes(out)

    ops = st.lists(st.tuples(st.integers(0, 4), st.integers(0, n), st.integers(0, 255)), min_size=1, max_size=4)
    return ops.map(apply)


TEXT_NOISE = st.text(alphabet=string.printable + "\u00e9\u4e2d\U0001f600\x00", max_size=200)


def assert_holds(target, case) -> None:
    """The test suite's check: this case gave a valid result or a typed error, nothing else."""
    outcome = target.run(case)
    assert outcome.holds, f"{target.entry}: {outcome.kind}\n{outcome.detail}\ncase: {repr(case)[:800]}"
