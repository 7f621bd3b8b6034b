"""`attamba eval-ppl`: token- and word-level perplexity over non-overlapping windows."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import SPLITS, encode_corpus, eval_windows, read_split, word_count
from models.lm import LM
from models.loading import load_model
from models.registry import resolve_model
from models.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_ids(model: LM, ids: torch.Tensor, seq_len: int, batch_size: int) -> tuple[float, int]:
    """Summed NLL (nats) and number of predicted tokens of a 1-D id tensor, every token but the first a target once."""
    device = model.embed.weight.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    windows = eval_windows(ids, seq_len)
    for start in range(0, len(windows), batch_size):
        group = windows[start : start + batch_size]
        for same_len in _split_by_length(group):
            batch = torch.stack(same_len).to(device)  # [B, n+1]
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(batch[:, :-1])  # [B, n, V] float32
            nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    model.train(was_training)
    return total, count


def _split_by_length(windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Group windows of equal length (only the corpus's last window can be shorter)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    return [g for g in groups.values() if g[0].numel() > 1]


def evaluate_ppl(model: LM, tokenizer: Tokenizer, text: str, seq_len: int, batch_size: int = 8,
                 max_tokens: int | None = None) -> dict:
    """Perplexities of `text` (optionally only its first max_tokens predicted tokens).

    Word-level perplexity divides the same total NLL by the whitespace-separated words of
    the evaluated text (all of it, or the prefix the first max_tokens+1 tokens decode to).
    """
    ids = encode_corpus(tokenizer, text)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
        text = tokenizer.decode(ids.tolist())
    if ids.numel() < 2:
        raise ValueError("text is too short to evaluate (needs at least 2 tokens)")
    nll, tokens = evaluate_ids(model, ids, seq_len, batch_size)
    words = word_count(text)
    return {
        "token_ppl": math.exp(nll / tokens),
        "word_ppl": math.exp(nll / words),
        "nll": nll,
        "loss": nll / tokens,
        "tokens": tokens,
        "words": words,
        "seq_len": seq_len,
        "windows": "non-overlapping",
    }


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, tokenizer.json) or named model")
    parser.add_argument("--split", default="test", choices=SPLITS, help="WikiText-2 split (default: test)")
    parser.add_argument("--text", help="evaluate this UTF-8 text file instead of a WikiText-2 split")
    parser.add_argument("--seq-len", type=int, help="window length (default: the model's training length)")
    parser.add_argument("--max-tokens", type=int, help="evaluate only the first N predicted tokens")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    model_dir = resolve_model(args.model)
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
    if any(v is not None and v < 1 for v in (args.batch_size, args.max_tokens, args.seq_len)):
        raise ValueError("--batch-size, --max-tokens and --seq-len must be positive")
    model = load_model(model_dir, device=args.device)
    seq_len = args.seq_len or model.config.max_seq_len
    text = Path(args.text).read_text(encoding="utf-8") if args.text else read_split(args.split)
    result = evaluate_ppl(model, Tokenizer.from_file(tok_file), text, seq_len, args.batch_size, args.max_tokens)
    source = {"text": args.text} if args.text else {"split": args.split}
    print(json.dumps({"model": str(model_dir), "kind": model.config.kind, **source, **result}, indent=2))
    return 0
