"""`make loadtest`: start `attamba serve` on 127.0.0.1, run locust headless against it for a bounded number of
users and seconds, stop both, and leave the CSV and JSON reports in --out.

    python loadtests/run.py --users 8 --seconds 30 --out loadtest-results -- --cache-memory 256MiB
(arguments after `--` go to `attamba serve`; `--locust-args` to locust, e.g. "--prompt-tokens fixed:64").
"""
from __future__ import annotations

import argparse
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(server: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server was not healthy within {timeout_s:g} s")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8, help="concurrent users (default: %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default: %(default)s)")
    parser.add_argument("--seconds", type=int, default=30, help="how long locust runs (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results"), help="report directory (default: %(default)s)")
    parser.add_argument("--locust-args", default="", help="more locust arguments, one shell-quoted string")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `attamba serve` arguments")
    args = parser.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "server.log", "w") as server_log:
        server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port",
                                   str(port), *serve_args], stdout=server_log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(server, url, timeout_s=120)
            command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
                       "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.seconds}s",
                       "--host", url, "--csv", str(args.out / "locust"), "--json-file", str(args.out / "locust"),
                       "--only-summary", "--stop-timeout", "10", *shlex.split(args.locust_args)]
            status = subprocess.run(command, timeout=args.seconds + 120).returncode
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(f"reports in {args.out}/: locust_stats.csv, locust.json, server.log")
    return status


if __name__ == "__main__":
    sys.exit(main())
