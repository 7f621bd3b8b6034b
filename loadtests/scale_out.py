"""Requests/s and TTFT of `attamba serve` as one process and as Ray Serve replicas, under the same load.

Each setup is started on a free 127.0.0.1 port, warmed up, sent the same closed-loop load (--concurrency
clients, --requests streaming completions in all; prompts in --groups groups that share a long prefix, so
the prefix router has something to keep together), and stopped; one JSON line per setup on stdout.

    python loadtests/scale_out.py --requests 96 --concurrency 16 -- --cache-memory 256MiB
(arguments after `--` go to every `attamba serve`).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import httpx
from servers import ROOT, attamba_command, free_port, running

SAMPLE = (ROOT / "tests" / "data" / "wikitext_sample.txt").read_text()
SETUPS = {
    "single": [],
    "single-1-thread": ["--threads", "1"],
    "ray-1": ["--replicas", "1", "--replica-cpus", "2"],
    "ray-2": ["--replicas", "2", "--replica-cpus", "1"],
    "ray-2-prefix": ["--replicas", "2", "--replica-cpus", "1", "--router", "prefix"],
}


def prompts(n: int, groups: int) -> list[str]:
    """n prompts: group g shares its first ~400 characters, then each prompt has its own tail."""
    lines = [line.strip() for line in SAMPLE.splitlines() if len(line.strip()) > 80]
    return [f"{lines[i % groups][:400]} {lines[(groups + i) % len(lines)][:80]}" for i in range(n)]


async def one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT, completion tokens) of one streaming completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else time.perf_counter() - start, tokens


async def load(url: str, texts: list[str], concurrency: int, max_tokens: int) -> dict[str, float]:
    queue = list(reversed(texts))
    results: list[tuple[float, int]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            results.append(await one(client, url, queue.pop(), max_tokens))

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts = sorted(t for t, _ in results)
    return {"requests": len(results), "wall_s": round(wall, 2), "requests_per_s": round(len(results) / wall, 3),
            "output_tok_per_s": round(sum(n for _, n in results) / wall, 1),
            "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3),
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3)}


def run_setup(name: str, serve_args: list[str], args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = attamba_command(port, ["--log-level", "warning", *SETUPS[name], *serve_args])
    with running(command, url, env=os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}):
        texts = prompts(args.requests, args.groups)
        asyncio.run(load(url, texts[: args.concurrency], args.concurrency, 4))  # warm-up
        return {"setup": name, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                **asyncio.run(load(url, texts, args.concurrency, args.max_tokens))}


def main() -> int:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--groups", type=int, default=4, help="prompt groups sharing a prefix (default: 4)")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    for name in args.setups:
        print(json.dumps(run_setup(name, serve_args, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
