"""`attamba bench prefix`: requests sharing a system prompt, with and without prefix caching,
Attamba against the full-KV transformer under the same cache budget (random weights, paper dims).

Each engine first runs an unrelated 64-token warm-up request; then the requests run one after
another (concurrency 1), so a request's TTFT is the time to compute what the cache does not hold
for it (the first request finds nothing cached). Reported per kind, prefix length and mode: hit
rate (hit tokens over the shareable ones: every request's system prompt except the first's),
TTFT p50/p99, total time, and the bytes one cached system prompt leaves in the cache (its full
blocks and its snapshots, by the engine's own rules).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from engine import EngineArgs, LLMEngine, SamplingParams
from engine.sequence import Sequence

from .engine_bench import _checkpoint


def _engine(path: Path, budget: int, caching: bool, max_len: int) -> LLMEngine:
    return LLMEngine(EngineArgs(model=str(path), cache_memory=budget, max_model_len=max_len, max_num_seqs=8,
                                enable_prefix_caching=caching))


def _ttft(engine: LLMEngine, rid: str, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - t0


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_mode(path: Path, prefix: list[int], suffixes: list[list[int]], budget: int, caching: bool) -> dict:
    engine = _engine(path, budget, caching, len(prefix) + 64)
    _ttft(engine, "warm-up", [3] * 64)
    warm = engine.stats()
    t0 = time.perf_counter()
    ttfts = [_ttft(engine, f"r{i}", prefix + s) for i, s in enumerate(suffixes)]
    total = time.perf_counter() - t0
    hits = engine.stats().prefix_cache_hits - warm.prefix_cache_hits
    shareable = (len(suffixes) - 1) * len(prefix)
    return {"requests": len(suffixes), "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99),
            "ttft_first_s": ttfts[0], "total_s": total, "hit_tokens": hits,
            "hit_rate_of_shareable": hits / shareable if caching and shareable else 0.0}


def cached_prefix_bytes(path: Path, prefix: list[int], budget: int) -> int:
    """Bytes a computed system prompt leaves in the prefix cache: its full blocks plus the snapshots
    its prefill saves (asked of a fresh engine's prefix cache, nothing computed)."""
    cache = _engine(path, budget, True, len(prefix) + 64).cache
    seq = Sequence("p", 0, prefix, SamplingParams(), 1, decoder=None)
    hit = cache.prefix.lookup(seq)
    blocks = len(cache.prefix.chain(seq)) + len(hit.points) * cache.layout.snapshot_blocks
    return blocks * cache.layout.block_bytes


def bench_prefix(prefix_lengths: list[int], requests: int, uncached_requests: int, suffix: int, budget: int) -> dict:
    result: dict = {"benchmark": "prefix", "requests": requests, "uncached_requests": uncached_requests,
                    "suffix_tokens": suffix, "cache_budget_bytes": budget, "dtype": "float32",
                    "threads": torch.get_num_threads(), "runs": []}
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("attamba", "transformer"):
            path = _checkpoint(Path(tmp), kind)
            for n in prefix_lengths:
                prefix = torch.randint(4, 500, (n,), generator=g).tolist()
                suffixes = [torch.randint(4, 500, (suffix,), generator=g).tolist() for _ in range(requests)]
                run = {"kind": kind, "prefix_tokens": n, "cached_prefix_bytes": cached_prefix_bytes(path, prefix, budget),
                       "cached": run_mode(path, prefix, suffixes, budget, True),
                       "uncached": run_mode(path, prefix, suffixes[:uncached_requests], budget, False)}
                run["ttft_p50_speedup"] = run["uncached"]["ttft_p50_s"] / run["cached"]["ttft_p50_s"]
                result["runs"].append(run)
    for n in prefix_lengths:
        att, tf = (next(r for r in result["runs"] if r["kind"] == k and r["prefix_tokens"] == n)
                   for k in ("attamba", "transformer"))
        result.setdefault("cached_prefix_ratio_transformer_over_attamba", {})[n] = (
            tf["cached_prefix_bytes"] / att["cached_prefix_bytes"])
    return result


def summary(result: dict) -> str:
    """A Markdown table of the runs."""
    rows = ["| kind | prefix | hit rate | TTFT p50 cached / uncached (s) | p99 cached / uncached (s) | speed-up p50 "
            "| total cached / uncached (s) | cached prefix (MiB) |", "|" + " --- |" * 8]
    for r in result["runs"]:
        c, u = r["cached"], r["uncached"]
        rows.append(f"| {r['kind']} | {r['prefix_tokens']} | {c['hit_rate_of_shareable']:.1%} | "
                    f"{c['ttft_p50_s']:.3f} / {u['ttft_p50_s']:.3f} | {c['ttft_p99_s']:.3f} / {u['ttft_p99_s']:.3f} | "
                    f"{r['ttft_p50_speedup']:.1f}x | {c['total_s']:.1f} ({c['requests']} req) / {u['total_s']:.1f} "
                    f"({u['requests']} req) | {r['cached_prefix_bytes'] / 2**20:.1f} |")
    return "\n".join(rows)
