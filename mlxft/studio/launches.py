"""Processes the studio starts: `mlxft train`, `mlxft train --resume`, `mlxft fuse`, as the CLI runs them.

Each launch runs the real CLI in a new session (detached: closing the browser, or the studio
itself, does not stop it), its output goes to a log file, and a record of it is written
atomically to RUNS/.studio/launches/<id>.json: command, pid, log, the run folder once
training names it. Stop sends SIGINT, the same as Ctrl-C in a terminal: the training loop
checkpoints and logs an `interrupted` event.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlxft.files import write_atomic
from mlxft.studio.security import StudioError, check_name

STATE_DIR = ".studio"  # under the runs folder; `mlxft runs` skips it (no config.json)
RUN_LINE = re.compile(r"^run folder: (.+)$", re.M)  # what `mlxft train` prints once its run folder exists
TAIL_BYTES = 16_000


@dataclass
class Launch:
    id: str
    kind: str  # train | resume | fuse
    argv: list[str]
    pid: int
    log: str
    started: str
    run: str | None = None  # run folder path, once known
    returncode: int | None = None
    stop_requested: str | None = None
    extra: dict = field(default_factory=dict)


class Launcher:
    """Start, find, stop and tail the processes launched from one runs folder."""

    def __init__(self, runs_dir: Path):
        self.runs_dir = runs_dir
        self.dir = runs_dir / STATE_DIR / "launches"
        self.children: dict[int, subprocess.Popen] = {}  # ours, so their exit codes are known and they are reaped

    # ------------------------------------------------------------ starting

    def start(self, kind: str, cli_args: list[str], run: Path | None = None) -> Launch:
        """Run `python -m mlxft.cli *cli_args` detached, logging to RUNS/.studio/launches/<id>.log."""
        self.dir.mkdir(parents=True, exist_ok=True)
        launch_id = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        log_path = self.dir / f"{launch_id}.log"
        argv = [sys.executable, "-m", "mlxft.cli", *cli_args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log tail is live, not block-buffered
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        self.children[proc.pid] = proc
        launch = Launch(launch_id, kind, argv, proc.pid, str(log_path), time.strftime("%Y-%m-%dT%H:%M:%S"),
                        str(run) if run else None)
        self._save(launch)
        return launch

    def train(self, recipe: str, tier: int | None, overrides: list[str], auto_fit: bool) -> Launch:
        args = ["train", "--runs-dir", str(self.runs_dir)]
        args += ["--tier", str(tier)] if tier else []
        args += [f"--set={item}" for item in overrides]  # one token each: an item can never read as a flag
        args += ["--auto-fit"] if auto_fit else []
        return self.start("train", [*args, "--", recipe])

    def resume(self, run: Path) -> Launch:
        self._refuse_if_busy(run)
        return self.start("resume", ["train", "--resume", str(run)], run)

    def fuse(self, run: Path) -> Launch:
        self._refuse_if_busy(run)
        return self.start("fuse", ["fuse", str(run), str(run / "fused")], run)

    def _refuse_if_busy(self, run: Path) -> None:
        live = self.live_for(run)
        if live:
            raise StudioError(f"{run.name} already has a running {live.kind} (pid {live.pid}); stop it first", 409)

    # ------------------------------------------------------------ reading

    def get(self, launch_id: str) -> Launch:
        path = self.dir / f"{check_name(launch_id, 'launch')}.json"
        if not path.is_file():
            raise StudioError(f"no launch {launch_id!r}", 404)
        return self._refresh(Launch(**json.loads(path.read_text())))

    def all(self) -> list[Launch]:
        """Every launch, newest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in sorted(self.dir.glob("*.json"), reverse=True):
            try:
                found.append(self._refresh(Launch(**json.loads(p.read_text()))))
            except (OSError, ValueError, TypeError):
                continue  # a record from another version: not ours to show
        return found

    def for_run(self, run: Path) -> Launch | None:
        """The newest launch that trained, resumed or fused `run`."""
        return next((x for x in self.all() if x.run and Path(x.run).resolve() == run.resolve()), None)

    def live_for(self, run: Path) -> Launch | None:
        return next((x for x in self.all() if x.run and Path(x.run).resolve() == run.resolve() and self.alive(x)), None)

    def alive(self, launch: Launch) -> bool:
        proc = self.children.get(launch.pid)
        if proc is not None:
            return proc.poll() is None
        if launch.returncode is not None:
            return False
        return _pid_runs_mlxft(launch.pid)

    def tail(self, launch: Launch, max_bytes: int = TAIL_BYTES) -> str:
        """The end of the launch's log as a terminal shows it (a progress bar's \\r rewrites keep the last)."""
        try:
            with open(launch.log, "rb") as f:
                f.seek(max(0, os.path.getsize(launch.log) - max_bytes))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))

    def _refresh(self, launch: Launch) -> Launch:
        """Fill in what has happened since the record was written: the run folder, the exit code."""
        changed = False
        if launch.run is None:
            match = RUN_LINE.search(self.tail(launch, 1 << 20))
            if match:
                launch.run, changed = str(Path(match.group(1).strip()).resolve()), True
        proc = self.children.get(launch.pid)
        if proc is not None and launch.returncode is None and proc.poll() is not None:
            launch.returncode, changed = proc.returncode, True
        if changed:
            self._save(launch)
        return launch

    # ------------------------------------------------------------ stopping

    def stop(self, run: Path) -> Launch:
        """Ctrl-C for the process training `run`: it checkpoints at the end of the step and stops."""
        launch = self.live_for(run)
        if launch is None or launch.kind not in ("train", "resume"):
            raise StudioError(f"{run.name} has no training process started by this studio (a run started in a "
                              "terminal stops with Ctrl-C there)", 409)
        os.kill(launch.pid, signal.SIGINT)
        launch.stop_requested = time.strftime("%Y-%m-%dT%H:%M:%S")
        self._save(launch)
        return launch

    def _save(self, launch: Launch) -> None:
        write_atomic(self.dir / f"{launch.id}.json", json.dumps(asdict(launch), indent=2) + "\n")


def _pid_runs_mlxft(pid: int) -> bool:
    """A launch from an earlier studio: its pid is alive and (where /proc tells) still runs mlxft, not a reused pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process now holds this pid
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return b"mlxft" in cmdline.read_bytes()
        except OSError:
            return False
    return True
