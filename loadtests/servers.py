"""A server process for a load test: start it on a free 127.0.0.1 port, wait until healthy, stop it, read its
Prometheus metrics. Used by run.py, sweep.py and scale_out.py (run as scripts from this directory).
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attamba_command(port: int, serve_args: list[str]) -> list[str]:
    """`attamba serve` on 127.0.0.1:port with these arguments, from this checkout."""
    return [sys.executable, "-m", "entrypoints.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *serve_args]


def wait_healthy(server: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll GET url/health until 200; exit with a message if the server dies or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server was not healthy within {timeout_s:g} s")
        time.sleep(0.2)


def stop(server: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within timeout_s."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def running(command: list[str], url: str, log: Path | None = None, timeout_s: float = 300,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """Run `command` (a server listening at url) from the repository root until the block ends."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        server = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(server, url, timeout_s)
            yield server
        finally:
            stop(server)
    finally:
        if log:
            out.close()


def metrics(url: str) -> dict[str, float]:
    """Every sample of url/metrics, summed over labels: {metric name: value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for name, value in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", text, re.M):
        values[name] = values.get(name, 0.0) + float(value)
    return values
