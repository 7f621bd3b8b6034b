"""`attamba bench {model,engine,kernels,cpu,gemv,smollm2,prefix}`: print JSON and write it (and a plot) to --out
(default bench-results/; the tracked results in docs/ are refreshed only with an explicit `--out docs`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.config import parse_bytes


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _dtypes(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in ("float32", "bfloat16", "float16")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected dtypes among float32,bfloat16,float16, got {text!r}")
    return names


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="suite", required=True)
    m = sub.add_parser("model", help="forward tokens/s, step latency and cache bytes: attamba vs transformer")
    m.add_argument("--lengths", type=_ints, default=[512, 2048, 8192])
    m.add_argument("--steps", type=int, default=16, help="decode steps timed per length")
    m.add_argument("--repeat", type=int, default=3)
    m.add_argument("--chunk-size", type=int, default=8)
    e = sub.add_parser("engine", help="capacity and decode throughput in this engine, vs HF transformers")
    e.add_argument("--batches", type=_ints, default=[1, 8, 32])
    e.add_argument("--contexts", type=_ints, default=[1024, 4096])
    e.add_argument("--capacity-contexts", type=_ints, default=[1024, 4096, 16384])
    e.add_argument("--budget", type=parse_bytes, default=parse_bytes("1GiB"), help="cache budget for capacity")
    e.add_argument("--steps", type=int, default=8)
    e.add_argument("--dtypes", type=_dtypes, default=["float32", "bfloat16"], help="engine dtypes (default: %(default)s)")
    e.add_argument("--thread-counts", type=_ints, default=[1, 2], help="torch threads, each a pass (default: %(default)s)")
    e.add_argument("--no-hf", action="store_true", help="skip the Hugging Face transformers reference")
    e.add_argument("--llamacpp", action="store_true",
                   help="also llama.cpp (llama-cpp-python, f16 GGUF of a Llama of the same dims) at batch 1")
    x = sub.add_parser("prefix", help="shared system prompt: prefix caching on/off, attamba vs transformer")
    x.add_argument("--prefix-lengths", type=_ints, default=[1024, 4096], help="system prompt tokens")
    x.add_argument("--requests", type=int, default=64)
    x.add_argument("--uncached-requests", type=int, default=4,
                   help="requests timed without caching (each recomputes the whole prompt)")
    x.add_argument("--suffix", type=int, default=32, help="distinct tokens after the system prompt")
    x.add_argument("--budget", type=parse_bytes, default=parse_bytes("1GiB"), help="cache budget of both kinds")
    k = sub.add_parser("kernels", help="decode kernels on CUDA: time and bandwidth vs the refs and SDPA")
    from .kernel_bench import configure as configure_kernels

    configure_kernels(k, _ints)
    c = sub.add_parser("cpu", help="CPU decode/prefill: teacher and student (dtypes, int8) vs transformers, llama.cpp")
    from .cpu_bench import configure as configure_cpu

    configure_cpu(c, _ints)
    v = sub.add_parser("gemv", help="CPU: the decode's bf16/fp16 products by our kernel and by the fp32 path")
    from .gemv_bench import configure as configure_gemv

    configure_gemv(v, _ints)
    s = sub.add_parser("smollm2", help="SmolLM2-135M: this engine vs HF transformers and llama.cpp (Q4_1, F16)")
    from .smollm2_bench import configure as configure_smollm2

    configure_smollm2(s, _ints)
    for p in (m, x):
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    for p in (m, e, x):
        p.add_argument("--out", type=Path, default=Path("bench-results"),
                       help="directory for the JSON and the plot (default: %(default)s; docs/ holds the shipped "
                            "results, refresh them with --out docs)")
        p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.suite == "kernels":
        from .kernel_bench import run as run_kernels

        return run_kernels(args)
    if args.suite == "cpu":
        from .cpu_bench import run as run_cpu

        return run_cpu(args)
    if args.suite == "gemv":
        from .gemv_bench import run as run_gemv

        return run_gemv(args)
    if args.suite == "smollm2":
        from .smollm2_bench import run as run_smollm2

        return run_smollm2(args)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite == "prefix":
        from .prefix_bench import bench_prefix, summary

        result = bench_prefix(args.prefix_lengths, args.requests, args.uncached_requests, args.suffix, args.budget)
        print(summary(result))
    elif args.suite == "model":
        from .model_bench import bench_model

        result = bench_model(args.lengths, ["attamba", "transformer"], args.steps, args.repeat, args.chunk_size)
    else:
        from .engine_bench import bench_engine, plot_engine

        result = bench_engine(args.batches, args.contexts, args.capacity_contexts, args.budget, args.steps,
                              args.dtypes, args.thread_counts, hf=not args.no_hf, llamacpp=args.llamacpp)
        if not args.no_plot:
            plot_engine(result, args.out / "bench-engine.png")
    (args.out / f"bench-{args.suite}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
