"""`mlxft train --hosts H1,H2` / `--hostfile JSON`: start the ranks of a data-parallel run with mlx.launch.

    mlxft train RECIPE --hosts 10.0.0.1,10.0.0.2        # mlxft runs mlx.launch for you
    mlxft train RECIPE --hostfile hosts.json            # mlx.launch's JSON hostfile

Each rank runs the same `mlxft train` command without the launch options; the ranks then join
one group (training/distributed.py). mlx.launch itself exits 0 even when a rank fails, so its
per-rank status lines are read to return a meaningful exit code.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mlxft.errors import ConfigError, MlxftError


LAUNCH_OPTIONS = ("--hosts", "--hostfile", "--launch-arg")


def rank_argv(argv: list[str]) -> list[str]:
    """The `mlxft` arguments each rank runs: these without the launch options."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not any(arg.startswith(opt + "=") for opt in LAUNCH_OPTIONS):
            out.append(arg)
    return out


def hostfile_for(hosts: str) -> dict:
    """mlx.launch's hostfile for `--hosts a,b`: ssh to each name, ring over its resolved IP."""
    names = [h.strip() for h in hosts.split(",")]
    if len(names) < 2 or not all(names):
        raise ConfigError(f"--hosts {hosts!r}: expected two or more comma-separated hosts, e.g. 10.0.0.1,10.0.0.2")
    entries = []
    for name in names:
        if name == "localhost":
            name = "127.0.0.1"  # mlx.launch runs 127.0.0.1 locally, anything else over ssh
        try:
            ip = str(ipaddress.ip_address(name))
        except ValueError:
            try:
                ip = socket.gethostbyname(name)
            except OSError as e:
                raise ConfigError(f"--hosts: cannot resolve {name!r} ({e}); give its IP or use --hostfile") from None
        entries.append({"ssh": name, "ips": [ip]})
    return {"hosts": entries}


def launch(argv: list[str], hosts: str | None, hostfile: str | None, launch_args: tuple[str, ...] = ()) -> int:
    """Run `mlxft ARGV` on every host through mlx.launch; return the job's exit code.

    mlx.launch itself exits 0 even when a rank fails, so its per-rank status lines are read
    (and relayed) to return rank 0's code, or 1 when another rank failed.
    """
    if hosts and hostfile:
        raise ConfigError("give --hosts or --hostfile, not both")
    if hostfile and not Path(hostfile).is_file():
        raise ConfigError(f"--hostfile {hostfile}: no such file")
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or shutil.which("mlx.launch")
    if launcher is None:
        raise MlxftError(f"mlx.launch not found next to {sys.executable} or on PATH; reinstall mlx")
    with tempfile.TemporaryDirectory(prefix="mlxft-launch-") as tmp:
        if hosts:
            hostfile = str(Path(tmp) / "hosts.json")
            Path(hostfile).write_text(json.dumps(hostfile_for(hosts)))
        env = [f"--env=MLXFT_DIST_TIMEOUT={os.environ['MLXFT_DIST_TIMEOUT']}"] if os.environ.get("MLXFT_DIST_TIMEOUT") else []
        cmd = [launcher, "--hostfile", hostfile, *env, *launch_args, "--", sys.executable, "-m", "mlxft.cli", *argv]
        return relay(cmd)


_STATUS = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


def relay(cmd: list[str]) -> int:
    # Ctrl-C is ignored by mlx.launch (it would stop relaying the ranks' output); the local
    # ranks get it from the terminal, checkpoint, and tell the remote ones via the stop check.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    codes: dict[int, int] = {}
    tail = ""
    while True:
        try:
            chunk = os.read(proc.stderr.fileno(), 65536)
        except KeyboardInterrupt:
            continue
        if not chunk:
            break
        sys.stderr.buffer.write(chunk)
        sys.stderr.buffer.flush()
        tail += chunk.decode(errors="replace")
        *lines, tail = tail.split("\n")
        for line in lines:
            if m := _STATUS.search(line):
                code = int(m.group(2)) if m.group(2) is not None else 1
                codes[int(m.group(1))] = 128 - code if code < 0 else code
    while True:
        try:
            proc.wait()
            break
        except KeyboardInterrupt:
            continue
    if proc.returncode:
        return proc.returncode
    if codes.get(0):
        return codes[0]
    return 1 if any(codes.values()) else 0

