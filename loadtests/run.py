"""`make loadtest`: start `attamba serve` on 127.0.0.1, run locust headless against it for a bounded number of
users and seconds, stop both, and leave the CSV and JSON reports in --out.

    python loadtests/run.py --users 8 --seconds 30 --out loadtest-results -- --cache-memory 256MiB
(arguments after `--` go to `attamba serve`; `--locust-args` to locust, e.g. "--prompt-tokens fixed:64").
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from servers import attamba_command, free_port, metrics, running

HERE = Path(__file__).parent


def _rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def _sample_rss(pid: int, every_s: float, path: Path, stop: threading.Event) -> None:
    """Write (seconds since start, RSS MiB) every `every_s` seconds until stopped."""
    t0 = time.monotonic()
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["seconds", "rss_mib"])
        while True:
            out.writerow([round(time.monotonic() - t0, 1), round(_rss_mib(pid), 1)])
            f.flush()
            if stop.wait(every_s):
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=8, help="concurrent users (default: %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second (default: %(default)s)")
    parser.add_argument("--seconds", type=int, default=30, help="how long locust runs (default: %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    parser.add_argument("--out", type=Path, default=Path("loadtest-results"), help="report directory (default: %(default)s)")
    parser.add_argument("--rss-every", type=float, default=0.0,
                        help="sample the server's resident memory every this many seconds into rss.csv (0: off)")
    parser.add_argument("--locust-args", default="", help="more locust arguments, one shell-quoted string")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then `attamba serve` arguments")
    args = parser.parse_args()
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    args.out.mkdir(parents=True, exist_ok=True)
    with running(attamba_command(port, serve_args), url, args.out / "server.log", timeout_s=120) as server:
        stop = threading.Event()
        try:
            if args.rss_every:
                threading.Thread(target=_sample_rss, args=(server.pid, args.rss_every, args.out / "rss.csv", stop),
                                 daemon=True).start()
            command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
                       "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.seconds}s",
                       "--host", url, "--csv", str(args.out / "locust"), "--json-file", str(args.out / "locust"),
                       "--only-summary", "--stop-timeout", "10", *shlex.split(args.locust_args)]
            status = subprocess.run(command, timeout=args.seconds + 120).returncode
            time.sleep(2)  # the last streams end and free their cache
            now = metrics(url)
            after = {name: now.get(name, 0.0) for name in (
                "attamba_cache_bytes_used", "attamba_num_requests_running", "attamba_num_requests_waiting")}
            (args.out / "after.json").write_text(json.dumps(after, indent=2) + "\n")
            if any(after.values()):
                print(f"cache not empty after the load: {after}", file=sys.stderr)
                status = status or 1
        finally:
            stop.set()
    print(f"reports in {args.out}/: locust_stats.csv, locust.json, after.json, server.log"
          + (", rss.csv" if args.rss_every else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
