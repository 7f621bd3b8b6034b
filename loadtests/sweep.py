"""Concurrency sweep: the same streaming load, 1 to 64 users at several context lengths, against attamba-wt2,
transformer-wt2 (both `attamba serve`, the same --cache-memory) and llama.cpp's `llama-server` on a GGUF of
transformer-wt2 (same weights and tokenizer, f16, parallel slots holding the same cache bytes).

    python loadtests/sweep.py --out docs/loadtest-sweep --contexts 4096 1024 --users 1 2 4 8 16 32 64 \\
        --seconds 60 --output-tokens 128 --cache-memory 200MiB --llama-server build/llama.cpp/llama-server
(the defaults; `make sweep` builds llama-server first, runs this and plots it).

Each system is started once per context; each point runs locust headless (loadtests/locustfile.py) with that
many users for --seconds, each request `context` tokens in all: a prompt of `context - output_tokens` random
token ids and --output-tokens forced outputs (so every server's per-sequence limit is exactly `context`).
While it runs, the server's /metrics are sampled every --sample-every seconds: requests running and waiting
(llama.cpp: processing and deferred), preemptions, and the generated-token counter, which gives the output
tokens/s over the window. Per point, one JSON line (also appended to OUT/sweep.jsonl) with locust's TTFT,
inter-token and time-per-output-token percentiles; locust's CSVs per point under OUT/raw/.
`python loadtests/plot_sweep.py OUT` draws them.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from servers import ROOT, attamba_command, free_port, metrics, running

sys.path.insert(0, str(ROOT))  # the project's packages, when run as a script
from engine.config import parse_bytes  # noqa: E402
from models import ModelConfig  # noqa: E402
from models.gguf import write_gguf  # noqa: E402

HERE = Path(__file__).parent
SYSTEMS = ("attamba", "transformer", "llamacpp")
LLAMA_SERVER = ROOT / "build" / "llama.cpp" / "llama-server"
CHECKPOINTS = {"attamba": ROOT / "checkpoints" / "attamba-wt2", "transformer": ROOT / "checkpoints" / "transformer-wt2"}
# metric names per server: (running, waiting, preemptions, generated tokens)
ATTAMBA_METRICS = ("attamba_num_requests_running", "attamba_num_requests_waiting", "attamba_num_preemptions_total",
                   "attamba_generation_tokens_total")
LLAMACPP_METRICS = ("llamacpp:requests_processing", "llamacpp:requests_deferred", None, "llamacpp:tokens_predicted_total")


def llamacpp_setup(gguf: Path, context: int, cache_bytes: int, max_users: int, threads: int,
                   batch_tokens: int = 512) -> tuple[list[str], int]:
    """llama-server arguments for parallel slots of `context` tokens that hold at most cache_bytes of f16 KV, and
    steps of at most batch_tokens tokens (its -b; -ub, the physical batch, stays at its default 512 or less)."""
    cfg = ModelConfig.load(CHECKPOINTS["transformer"] / "config.json")
    per_token = 2 * cfg.n_layers * cfg.num_kv_heads * cfg.head_dim * 2  # K and V, f16
    slots = max(1, min(max_users, cache_bytes // (per_token * context)))
    return ["-m", str(gguf), "-np", str(slots), "-c", str(slots * context), "-t", str(threads), "-tb", str(threads),
            "-b", str(batch_tokens), "-ub", str(min(batch_tokens, 512)), "-fa", "on", "--metrics", "--no-webui"], slots


def _percentile(row: dict[str, str], column: str) -> float | None:
    value = row.get(column, "N/A")
    return None if value in ("N/A", "") else float(value)


def locust_summary(prefix: Path) -> dict[str, float | int | None]:
    """Requests, failures and the TTFT, inter-token and per-output-token percentiles (ms) from locust's CSV."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    stream = rows.get("completions [stream]", {})
    ttft, itl = rows.get("time_to_first_token", {}), rows.get("inter_token_latency", {})
    tpot = rows.get("time_per_output_token", {})
    return {"requests": int(stream.get("Request Count", 0)), "failures": int(stream.get("Failure Count", 0)),
            "ttft_p50_ms": _percentile(ttft, "50%"), "ttft_p99_ms": _percentile(ttft, "99%"),
            "itl_p50_ms": _percentile(itl, "50%"), "itl_p99_ms": _percentile(itl, "99%"),
            "tpot_p50_ms": _percentile(tpot, "50%"), "tpot_p99_ms": _percentile(tpot, "99%"),
            "tokens_streamed": int(ttft.get("Request Count", 0)) + int(itl.get("Request Count", 0))}


class Sampler:
    """Samples (seconds, running, waiting, preemptions, generated tokens) from /metrics until stopped."""

    def __init__(self, url: str, names: tuple[str | None, ...], every_s: float) -> None:
        self.url, self.names, self.every_s = url, names, every_s
        self.samples: list[tuple[float, ...]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                m = metrics(self.url)
                self.samples.append((time.monotonic() - self.t0, *(m.get(n, 0.0) if n else 0.0 for n in self.names)))
            except OSError:
                pass  # a scrape that timed out under load: the next one counts
            self._stop.wait(self.every_s)

    def stop(self) -> list[tuple[float, ...]]:
        self._stop.set()
        self._thread.join()
        return self.samples


def wait_idle(url: str, names: tuple[str | None, ...], timeout_s: float = 300) -> None:
    """Until nothing runs or waits (the streams cut at the end of a point are aborted server-side)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = metrics(url)
        if not m.get(names[0], 0) and not m.get(names[1], 0):
            return
        time.sleep(0.5)
    raise SystemExit(f"{url} still busy {timeout_s:g} s after a point")


def run_point(url: str, names: tuple[str | None, ...], users: int, context: int, args: argparse.Namespace,
              raw: Path) -> dict:
    """One locust run of `users` users; the server's queue and token counters sampled meanwhile."""
    wait_idle(url, names)
    sampler = Sampler(url, names, args.sample_every)
    command = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(users),
               "-r", str(users), "-t", f"{args.seconds}s", "--host", url, "--csv", str(raw), "--only-summary",
               "--stop-timeout", "0", "--loglevel", "ERROR", "--prompt-tokens", f"fixed:{context - args.output_tokens}",
               "--prompt-ids", args.prompt_ids, "--output-tokens", f"fixed:{args.output_tokens}"]
    with open(f"{raw}-locust.log", "w") as log:
        subprocess.run(command, cwd=ROOT, timeout=args.seconds + 120, stdout=log, stderr=subprocess.STDOUT)
    samples = sampler.stop()
    # the window: from when locust's users were all spawned to its end, so the token rate is steady-state-ish
    window = [s for s in samples if 1.0 <= s[0] <= args.seconds + 1.0] or samples
    first, last = window[0], window[-1]
    span = max(last[0] - first[0], 1e-9)
    return {"users": users, "context": context, "output_tokens": args.output_tokens, "seconds": args.seconds,
            **locust_summary(raw),
            "output_tok_s": round((last[4] - first[4]) / span, 1),
            "running_mean": round(sum(s[1] for s in window) / len(window), 2),
            "running_max": int(max(s[1] for s in window)),
            "waiting_mean": round(sum(s[2] for s in window) / len(window), 2),
            "waiting_max": int(max(s[2] for s in window)),
            "preemptions": int(samples[-1][3] - samples[0][3]) if names[2] else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--contexts", nargs="+", type=int, default=[4096, 1024],
                        help="tokens per request, prompt and output (default: %(default)s)")
    parser.add_argument("--users", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=int, default=60, help="locust run time per point (default: %(default)s)")
    parser.add_argument("--output-tokens", type=int, default=128, help="forced output length (default: %(default)s)")
    parser.add_argument("--cache-memory", default="200MiB", help="cache bytes for every system (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="server threads (default: %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=512,
                        help="tokens one step computes, prefill chunks and decodes: our --max-num-batched-tokens, "
                             "llama.cpp's -b (default: %(default)s, our engine's default)")
    parser.add_argument("--prompt-ids", default="4:8192", help="token id range of the prompts (default: %(default)s)")
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between /metrics scrapes")
    parser.add_argument("--llama-server", default=shutil.which("llama-server") or str(LLAMA_SERVER),
                        help="llama.cpp's llama-server binary (default: on PATH, else %(default)s, which "
                             "`make llama-server` builds)")
    args = parser.parse_args()
    if "llamacpp" in args.systems and not (args.llama_server and Path(args.llama_server).is_file()):
        parser.error("llamacpp needs --llama-server PATH (build one with `make llama-server`)")
    cache_bytes = parse_bytes(args.cache_memory)
    (args.out / "raw").mkdir(parents=True, exist_ok=True)
    results = args.out / "sweep.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems:
            for context in args.contexts:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                setup: dict[str, object] = {"system": system, "cache_memory": args.cache_memory, "threads": args.threads,
                                            "batch_tokens": args.batch_tokens}
                if system == "llamacpp":
                    gguf = Path(tmp) / "transformer-wt2-f16.gguf"
                    write_gguf(CHECKPOINTS["transformer"], gguf, "f16", context_length=context,
                               vocab_from=CHECKPOINTS["transformer"] / "tokenizer.json")
                    server_args, slots = llamacpp_setup(gguf, context, cache_bytes, max(args.users), args.threads,
                                                        args.batch_tokens)
                    command = [args.llama_server, "--host", "127.0.0.1", "--port", str(port), *server_args]
                    names, setup["slots"] = LLAMACPP_METRICS, slots
                else:
                    command = attamba_command(port, [
                        "--model", str(CHECKPOINTS[system]), "--cache-memory", args.cache_memory,
                        "--max-model-len", str(context), "--max-num-seqs", str(max(args.users)),
                        "--max-num-batched-tokens", str(args.batch_tokens), "--no-enable-prefix-caching",
                        "--threads", str(args.threads), "--log-level", "warning"])
                    names = ATTAMBA_METRICS
                log = args.out / "raw" / f"{system}-{context}-server.log"
                with running(command, url, log):
                    for users in args.users:
                        point = {**setup, **run_point(url, names, users, context, args,
                                                      args.out / "raw" / f"{system}-{context}-{users}")}
                        print(json.dumps(point), flush=True)
                        with open(results, "a") as f:
                            f.write(json.dumps(point) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
