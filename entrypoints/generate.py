"""`attamba generate`: stream one completion of a prompt to stdout as it is generated."""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from engine.async_engine import AsyncEngine
from engine.config import EngineArgs
from engine.admission import PreparedRequest
from engine.sampling_params import SamplingParams
from engine.settings import add_flags, from_args


def configure(parser: argparse.ArgumentParser) -> None:
    # one completion runs one sequence: the compiled decode step is built for batch 1 only
    add_flags(parser, EngineArgs, defaults={"max_num_seqs": 1})
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")


async def _stream(engine: AsyncEngine, request: PreparedRequest) -> None:
    async for delta in engine.generate(f"generate-{uuid.uuid4().hex}", request):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")


def run(args: argparse.Namespace) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    engine = AsyncEngine(from_args(EngineArgs, args))
    request = engine.gate.prepare(args.prompt, params)
    engine.start()
    try:
        asyncio.run(_stream(engine, request))
    finally:
        engine.shutdown()
    return 0
