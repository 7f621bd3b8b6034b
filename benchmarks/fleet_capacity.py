"""The inputs of a fleet capacity model (docs/scale-out.md): per checkpoint, the cache bytes one sequence of a
context holds, how many such sequences a replica's cache budget admits, and the decode tokens/s of one
replica running that many (contexts filled synthetically, as `attamba bench engine` does).

    python -m benchmarks.fleet_capacity --context 4096 --budget 1GiB --threads 1
prints one JSON line per checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from engine.cache_layout import CacheLayout
from engine.config import parse_bytes
from models import ModelConfig

from .engine_bench import engine_decode

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = [ROOT / "checkpoints" / "attamba-wt2", ROOT / "checkpoints" / "transformer-wt2"]


def seq_bytes(layout: CacheLayout, context: int) -> int:
    """What the allocator reserves for one sequence of `context` tokens: its slot and its blocks."""
    return layout.slot_bytes + layout.blocks(context) * layout.block_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--budget", type=parse_bytes, default=parse_bytes("1GiB"), help="cache bytes per replica")
    parser.add_argument("--max-batch", type=int, default=64, help="largest decode batch timed (default: 64)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in CHECKPOINTS:
        cfg = ModelConfig.load(path / "config.json")
        layout = CacheLayout.for_model(cfg, 16, torch.float32)
        per_seq = seq_bytes(layout, args.context)
        fit = args.budget // per_seq
        batch = max(1, min(fit, args.max_batch))
        tok_s = engine_decode(path, batch, args.context, args.steps, "float32")
        print(json.dumps({
            "checkpoint": path.name, "context": args.context, "threads": args.threads,
            "seq_bytes_fp32": per_seq, "seq_bytes_bf16": seq_bytes(CacheLayout.for_model(cfg, 16, torch.bfloat16),
                                                                   args.context),
            "budget_bytes": args.budget, "seqs_per_replica": fit, "decode_batch": batch,
            "decode_tok_s": round(tok_s, 1), "tok_s_per_seq": round(tok_s / batch, 2)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
