"""Two weight formats on the chat set (issue 21): greedy replies of one checkpoint in each, through its chat
template, on the reference decoding path. Formats: `bf16` as the engine builds it on a CPU without native bf16
(models/upcast.py: fp32 matrix-matrix products, the FFN and head weights held as fp16), `bf16-plain` (every
linear a plain bf16 F.linear, the slow twin), `int8` (weight-only, models/quant.py). Prints JSON: correct answers
per format, identical replies, and the mean number of tokens before two replies first differ.

    python -m benchmarks.format_agreement --model checkpoints/attamba-smollm2-p8-l64 [--formats bf16,int8]
"""
from __future__ import annotations

import argparse
import json

import torch

from models.loading import load_model
from models.quant import INT8_LINEARS, quantize_linears
from models.registry import resolve_model
from models.tokenizer import Tokenizer
from models.upcast import upcast_linears
from server.chat import load_chat_template
from training.long_eval import answered, chat_replies, load_chat_set

FORMATS = {"bf16": upcast_linears, "bf16-plain": lambda model: None,
           "int8": lambda model: quantize_linears(model, INT8_LINEARS)}


def replies(path, fmt: str, items: list[dict], tokenizer: Tokenizer, max_tokens: int) -> list[list[int]]:
    """Greedy reply ids (cut at the template's first stop token) to each chat-set question."""
    model = load_model(path, "cpu", torch.bfloat16)
    FORMATS[fmt](model)
    chat = load_chat_template(model.config, tokenizer)
    return chat_replies(model, tokenizer, chat.render, items, max_tokens, tuple(chat.stop_token_ids))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a checkpoint directory or a named model")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="bf16,int8", help=f"two of {', '.join(FORMATS)}, comma-separated")
    args = parser.parse_args(argv)
    formats = args.formats.split(",")
    if len(formats) != 2 or not set(formats) <= set(FORMATS):
        parser.error(f"--formats: two of {', '.join(FORMATS)}, got {args.formats!r}")
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = Tokenizer.from_file(path / "tokenizer.json")
    items = load_chat_set()
    out = {fmt: replies(path, fmt, items, tokenizer, args.max_tokens) for fmt in formats}
    correct = {fmt: sum(answered(it, tokenizer.decode(r)) for it, r in zip(items, rs)) for fmt, rs in out.items()}
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                  for a, b in zip(*out.values())]
    print(json.dumps({"model": args.model, "questions": len(items), "correct": correct,
                      "identical_replies": sum(a == b for a, b in zip(*out.values())),
                      "mean_tokens_before_first_difference": round(sum(first_diff) / len(first_diff), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
