"""`attamba bench model`: whole-sequence forward throughput, one-token step latency and cache bytes,
Attamba against a full transformer of the same width and depth (random weights, batch 1)."""
from __future__ import annotations

import time

import torch

from models import ModelConfig, build_model, decode_step, full_kv_bytes, prefill, state_bytes


def paper_config(kind: str, vocab_size: int = 8192, **kw) -> ModelConfig:
    """The paper's default dims (d 512, 8 layers, 8 heads, P 8, L 8, N 128, E 256)."""
    return ModelConfig(kind=kind, vocab_size=vocab_size, max_seq_len=1024, **kw)


def timed(fn, repeat: int) -> float:
    """Median wall time of fn() over `repeat` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _step_latency(model, ids: torch.Tensor, T: int, steps: int) -> float:
    """Seconds per decode step after a prefill of T tokens."""
    _, state = prefill(model, ids[:, :T], reserve=steps)
    t0 = time.perf_counter()
    for t in range(T, T + steps):
        decode_step(model, ids[:, t], state)
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def bench_model(lengths: list[int], kinds: list[str], steps: int = 16, repeat: int = 3, chunk_size: int = 8) -> dict:
    """Forward tokens/s, decode step latency (ms) and cache MiB per sequence at each length."""
    rows = []
    for kind in kinds:
        cfg = paper_config(kind, chunk_size=chunk_size)
        model = build_model(cfg, seed=0).eval()
        for T in lengths:
            ids = torch.randint(0, cfg.vocab_size, (1, T + steps))
            fwd = timed(lambda: model(ids[:, :T]), repeat)

            step_s = _step_latency(model, ids, T, steps)
            rows.append({
                "kind": kind, "seq_len": T, "forward_tokens_per_s": round(T / fwd, 1),
                "forward_s": round(fwd, 4), "step_latency_ms": round(1000 * step_s, 2),
                "cache_mib_fp16": round(state_bytes(cfg, T) / 2**20, 3),
                "cache_mib_fp32": round(state_bytes(cfg, T, torch.float32) / 2**20, 3),
                "full_kv_mib_fp16": round(full_kv_bytes(cfg, T) / 2**20, 3),
            })
            print(rows[-1], flush=True)
    summary = {}
    for T in lengths:
        by = {r["kind"]: r for r in rows if r["seq_len"] == T}
        if "attamba" in by and "transformer" in by:
            a, t = by["attamba"], by["transformer"]
            summary[str(T)] = {
                "forward_speedup": round(a["forward_tokens_per_s"] / t["forward_tokens_per_s"], 3),
                "step_speedup": round(t["step_latency_ms"] / a["step_latency_ms"], 3),
                "cache_ratio_fp16": round(t["cache_mib_fp16"] / a["cache_mib_fp16"], 3),
            }
    return {"benchmark": "model", "dims": paper_config("attamba", chunk_size=chunk_size).to_dict(),
            "threads": torch.get_num_threads(), "rows": rows, "attamba_vs_transformer": summary}
