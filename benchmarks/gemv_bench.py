"""`attamba bench gemv`: one decode layer's products (SmolLM2-135M's shapes: the student's packed q/k/v/SSM
input, wo, the FFN in fp16) and the head, by kernels/cpu_gemv.py's op and by the fp32 path that products of more
rows take (models/upcast.py), for batches of rows; medians of milliseconds, both in one process."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu_gemv
from models.upcast import CHUNK_BYTES

from .model_bench import timed

D, FFN, VOCAB = 576, 1536, 49152
# (out, in, dtype) of one student layer's products as models/upcast.py holds them
LAYER = [(1288, D, torch.bfloat16), (D, D, torch.bfloat16), (FFN, D, torch.float16), (FFN, D, torch.float16),
         (D, FFN, torch.float16)]


def _fp32(x: Tensor, w: Tensor) -> Tensor:
    """The fp32 path of models/upcast.py: the weight upcast a chunk at a time, then F.linear."""
    rows = max(1, CHUNK_BYTES // (4 * w.shape[1]))
    return torch.cat([F.linear(x, part.float()) for part in w.split(rows)], -1)


def bench_gemv(rows: list[int], repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    layer = [torch.randn(n, k, generator=g).to(dt) for n, k, dt in LAYER]
    head = torch.randn(VOCAB, D, generator=g).half()
    out = []
    for m in rows:
        xs = [torch.randn(m, w.shape[1], generator=g) for w in layer]
        xh = torch.randn(m, D, generator=g)
        row = {"rows": m}
        for name, product in (("kernel", cpu_gemv.gemv), ("fp32", _fp32)):
            row[f"layer_{name}_ms"] = 1e3 * timed(lambda: [product(x, w) for x, w in zip(xs, layer)], repeat)
            row[f"head_{name}_ms"] = 1e3 * timed(lambda: product(xh, head), max(3, repeat // 3))
        out.append(row)
    return {"threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(), "results": out}


def configure(parser: argparse.ArgumentParser, ints) -> None:
    parser.add_argument("--rows", type=ints, default=[1, 3, 4, 8, 16, 32, 64])
    parser.add_argument("--repeat", type=int, default=15, help="timings per cell (the median is kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for bench-gemv.json")


def run(args: argparse.Namespace) -> int:
    if not cpu_gemv.load():
        raise SystemExit("attamba bench gemv: the kernel did not build here (it needs g++ and an AVX2 CPU)")
    torch.set_num_threads(args.threads)
    result = bench_gemv(args.rows, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench-gemv.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
