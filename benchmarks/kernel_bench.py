"""`attamba bench kernels`: the decode kernels on CUDA at the paper's dims, against their PyTorch
refs and against torch's scaled_dot_product_attention over a full KV cache of the same dims.

Per kernel, batch and context: median time (triton.testing.do_bench, L2 flushed between runs),
the bytes it must move, the achieved bandwidth and its fraction of the GPU's peak (looked up by
device name: `peak_bandwidth`). One layer is timed; its boundary pool holds context / P + 1
entries per sequence and the ring W = L + 1. `decode_steps` times whole engine decode steps.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from models.kv_spec import CacheSpec

from .model_bench import paper_config

# Peak DRAM bandwidth (bytes/s) by device-name fragment, most specific first (vendor datasheets).
PEAKS = [
    ("H100 PCIe", "H100 PCIe (HBM2e)", 2.0e12),
    ("H100 NVL", "H100 NVL (HBM3)", 3.9e12),
    ("H100", "H100 SXM (HBM3)", 3.35e12),
    ("H200", "H200 (HBM3e)", 4.8e12),
    ("GH200", "GH200 (HBM3)", 4.0e12),
    ("A100-SXM4-80GB", "A100 SXM 80GB (HBM2e)", 2.039e12),
    ("A100 80GB PCIe", "A100 PCIe 80GB (HBM2e)", 1.935e12),
    ("A100", "A100 40GB (HBM2)", 1.555e12),
    ("L40S", "L40S (GDDR6)", 0.864e12),
]


def peak_bandwidth(name: str) -> tuple[str, float | None]:
    """(which part the name was matched to, its peak bytes/s); None when the device is not listed."""
    for fragment, part, peak in PEAKS:
        if fragment in name:
            return part, peak
    return f"{name} (not listed: no fraction of peak)", None


def _time_us(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return 1e3 * do_bench(fn, warmup=10, rep=50, return_mode="median")


def _row(kernel: str, batch: int, context: int | None, us: float, nbytes: int, peak: float | None, **extra) -> dict:
    gbps = nbytes / us / 1e3
    return dict(kernel=kernel, batch=batch, context=context, time_us=round(us, 2), bytes=nbytes,
                GBps=round(gbps, 1), frac_peak=round(gbps * 1e9 / peak, 3) if peak else None, **extra)


def _attention_inputs(batch: int, context: int, dtype: torch.dtype, block_size: int = 16) -> dict:
    cfg = paper_config("attamba")
    H, D, P, W = cfg.n_heads, cfg.head_dim, cfg.chunk_size, CacheSpec.from_config(cfg).window_slots
    entries = context // P + 1
    M = -(-entries // block_size)
    dev = torch.device("cuda")
    k_cache = torch.randn(batch * M, block_size, H, D, device=dev, dtype=dtype)
    win_mask = torch.ones(batch, W, dtype=torch.bool, device=dev)
    win_mask[:, 0] = False  # one window position is a boundary, read from the blocks
    return dict(q=torch.randn(batch, H, D, device=dev, dtype=dtype), k_cache=k_cache, v_cache=torch.randn_like(k_cache),
                block_tables=torch.randperm(batch * M, device=dev).view(batch, M),
                context_lens=torch.full((batch,), entries, device=dev),
                win_k=torch.randn(batch, W, H, D, device=dev, dtype=dtype),
                win_v=torch.randn(batch, W, H, D, device=dev, dtype=dtype),
                slots=torch.arange(batch, device=dev), win_mask=win_mask, scale=D**-0.5)


def bench_attention(batch: int, context: int, dtype: torch.dtype, peak: float | None) -> list[dict]:
    """decode_attention (kernel and ref) and SDPA over the full cache, at one batch and context."""
    inp = _attention_inputs(batch, context, dtype)
    B, H, D = inp["q"].shape
    elt = inp["q"].element_size()
    read = 2 * B * H * D * elt * (int(inp["context_lens"][0]) + int(inp["win_mask"][0].sum()))
    nbytes = read + 2 * B * H * D * elt  # + q and the output
    rows = [_row("decode_attention", batch, context, _time_us(lambda: kernels.decode_attention_triton(**inp)), nbytes,
                 peak, ref_time_us=round(_time_us(lambda: kernels.decode_attention_ref(**inp)), 2))]
    inp.clear()  # free the kernel inputs before the full-KV tensors
    q = torch.randn(B, H, 1, D, device="cuda", dtype=dtype)
    k = torch.randn(B, H, context, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    full = 2 * k.numel() * elt + 2 * q.numel() * elt
    rows.append(_row("sdpa_full_kv", batch, context, _time_us(lambda: F.scaled_dot_product_attention(q, k, v)), full,
                     peak))
    return rows


def bench_per_token(batch: int, dtype: torch.dtype, peak: float | None) -> list[dict]:
    """ssm_step and store_kv: their cost does not depend on the context."""
    cfg = paper_config("attamba")
    G, h, N, E, W = 2, cfg.ssm_heads, cfg.ssm_state, cfg.ssm_inner, cfg.conv_width
    p, C, dev = E // h, E + 2 * N, torch.device("cuda")
    xbc, dt = torch.randn(batch, G, C, device=dev, dtype=dtype), torch.randn(batch, G, h, device=dev, dtype=dtype)
    conv = torch.zeros(G, batch, C, W - 1, device=dev, dtype=dtype)
    ssm = torch.zeros(G, batch, h, p, N, device=dev)
    weights = (torch.randn(G, C, W, device=dev), -torch.rand(G, h, device=dev), torch.ones(G, h, device=dev))
    slots, reset = torch.arange(batch, device=dev), torch.zeros(batch, dtype=torch.bool, device=dev)
    args = (xbc, dt, conv, ssm, *weights, slots, reset)
    elt = xbc.element_size()
    ssm_bytes = 2 * ssm.numel() * 4 + 2 * conv.numel() * elt + xbc.numel() * elt + batch * G * E * elt
    H, D = cfg.n_heads, cfg.head_dim
    k, v = torch.randn(batch, H, D, device=dev, dtype=dtype), torch.randn(batch, H, D, device=dev, dtype=dtype)
    k_cache, v_cache = torch.zeros(batch * 4, H, D, device=dev, dtype=dtype), torch.zeros(batch * 4, H, D, device=dev, dtype=dtype)
    where = torch.randperm(batch * 4, device=dev)[:batch]
    return [
        _row("ssm_step", batch, None, _time_us(lambda: kernels.ssm_step_triton(*args)), ssm_bytes, peak,
             ref_time_us=round(_time_us(lambda: kernels.ssm_step_ref(*args)), 2)),
        _row("store_kv", batch, None, _time_us(lambda: kernels.store_kv_triton(k, v, k_cache, v_cache, where)),
             4 * k.numel() * elt, peak,
             ref_time_us=round(_time_us(lambda: kernels.store_kv_ref(k, v, k_cache, v_cache, where)), 2)),
    ]


def decode_steps(batches: list[int], context: int, steps: int, dtype: str) -> list[dict]:
    """Engine decode tokens/s on CUDA at the paper's dims (random weights), kernels vs the PyTorch path."""
    from .engine_bench import _checkpoint, filled_engine

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _checkpoint(Path(tmp), "attamba")
        for batch in batches:
            row = dict(batch=batch, context=context, steps=steps)
            for name in ("torch", "triton"):
                with kernels.backend(name):
                    engine = filled_engine(path, batch, context, steps, dtype, device="cuda")  # warmed up, compiled
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(steps):
                        engine.step()
                    end.record()
                    torch.cuda.synchronize()
                    row[f"{name}_tokens_per_s"] = round(batch * steps / (start.elapsed_time(end) / 1e3), 1)
                    del engine
            rows.append(row)
    return rows


def bench_kernels(batches: list[int], contexts: list[int], dtype: str, decode_batches: list[int]) -> dict:
    if not torch.cuda.is_available():
        raise RuntimeError("the kernels benchmark needs a CUDA device, and none is available")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    name = torch.cuda.get_device_name()
    part, peak = peak_bandwidth(name)
    rows = []
    for batch in batches:
        rows += bench_per_token(batch, torch_dtype, peak)
        for context in contexts:
            rows += bench_attention(batch, context, torch_dtype, peak)
            torch.cuda.empty_cache()
    result = {"benchmark": "kernels", "device": name, "peak": part, "peak_bytes_per_s": peak, "dtype": dtype,
              "dims": paper_config("attamba").to_dict(), "rows": rows}
    if decode_batches:
        result["decode_steps"] = decode_steps(decode_batches, 1024, 16, dtype)
    return result


def configure(parser: argparse.ArgumentParser, ints: Callable[[str], list[int]]) -> None:
    parser.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    parser.add_argument("--contexts", type=ints, default=[1024, 4096, 16384, 32768])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--decode-batches", type=ints, default=[32, 128],
                        help="engine decode steps at 1k context (empty: skip)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for bench-kernels.json")


def run(args: argparse.Namespace) -> int:
    result = bench_kernels(args.batches, args.contexts, args.dtype, args.decode_batches)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
