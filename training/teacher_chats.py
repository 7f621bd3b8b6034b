"""Chats answered by the teacher itself (issue 19, item 4): questions written here, each answered once by the
teacher (greedy, through its chat template, on this project's engine), cached on disk and hash-checked, so stage
2 can distil the teacher's own way of answering besides Wikipedia leads (uptrain's `teacher_chats`).

    python -m training.teacher_chats --teacher smollm2-135m     # generate the cache once (or check it)

The questions stay clear of the chat evaluation's subjects (training/chat_eval.json; a test checks that no
accepted answer of it occurs in a question). The cache file is keyed by the sha256 of the teacher's weights,
the questions and the token limit; it stores the sha256 of its pairs, checked on every load.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from .data import DataError, _sha256, _write_atomic, cache_dir

TOPICS = (
    "a library", "a bicycle", "a volcano", "an earthquake", "a thunderstorm", "a rainbow", "a compass",
    "a refrigerator", "a thermometer", "a vaccine", "recycling", "a household budget", "a resume",
    "a healthy breakfast", "a good night's sleep", "a campfire", "a vegetable garden", "composting", "a bridge",
    "an airplane", "a train", "a battery", "a magnet", "electricity", "the internet", "a computer", "a password",
    "email", "a map", "a museum", "a hospital", "a farm", "bread", "cheese", "coffee", "tea", "chocolate",
    "a desert", "a forest", "a glacier", "a coral reef", "a telescope", "a microscope", "an orchestra",
    "a guitar", "chess", "a marathon", "yoga", "a job interview", "public transport",
)
TEMPLATES = ("What is {}?", "Describe {} in two sentences.", "Tell me something interesting about {}.",
             "What is {} used for?", "Explain {} to a ten-year-old.")
MAX_TOKENS = 160


def questions() -> list[str]:
    """Every template for every topic, capitalised."""
    return [(q := t.format(topic))[0].upper() + q[1:] for topic in TOPICS for t in TEMPLATES]


def cache_file(teacher_dir: Path, asked: list[str], max_tokens: int) -> Path:
    with open(teacher_dir / "model.safetensors", "rb") as f:
        weights = hashlib.file_digest(f, "sha256").hexdigest()
    key = _sha256(json.dumps([weights, asked, max_tokens]).encode())
    return cache_dir() / "teacher-chats" / f"{key[:32]}.json"


def generate(teacher_dir: Path, asked: list[str], max_tokens: int) -> list[str]:
    """The teacher's greedy answers, through its chat template on the engine."""
    from engine import LLM, SamplingParams
    from server.chat import load_chat_template

    llm = LLM(str(teacher_dir), enforce_eager=True)
    chat = load_chat_template(llm.engine.config, llm.tokenizer)
    outs = llm.generate([chat.render([("user", q)]) for q in asked], SamplingParams(temperature=0, max_tokens=max_tokens))
    return [o.text.strip() for o in outs]


def teacher_chats(teacher_dir: Path, asked: list[str] | None = None, max_tokens: int = MAX_TOKENS) -> list[tuple[str, str]]:
    """(question, teacher's answer) pairs: from the cache when it holds them (hash-checked), else generated once
    and cached. Raises DataError on a cache file that fails its check."""
    asked = questions() if asked is None else asked
    path = cache_file(teacher_dir, asked, max_tokens)
    if path.is_file():
        data = json.loads(path.read_text())
        pairs = [tuple(p) for p in data.get("pairs", [])]
        if data.get("sha256") != _sha256(json.dumps(data.get("pairs")).encode()) or [q for q, _ in pairs] != asked:
            raise DataError(f"{path} fails its check (edited or truncated); delete it and retry")
        return pairs
    pairs = [[q, a] for q, a in zip(asked, generate(teacher_dir, asked, max_tokens))]
    _write_atomic(path, (json.dumps({"teacher": str(teacher_dir), "max_tokens": max_tokens, "pairs": pairs,
                                     "sha256": _sha256(json.dumps(pairs).encode())}, indent=1) + "\n").encode())
    return [tuple(p) for p in pairs]


def main(argv: list[str] | None = None) -> int:
    from models.registry import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m", help="named model or checkpoint directory")
    args = parser.parse_args(argv)
    try:
        teacher_dir = resolve_model(args.teacher)
        pairs = teacher_chats(teacher_dir)
    except (ValueError, DataError, FileNotFoundError) as e:
        print(f"teacher_chats: error: {e}", file=sys.stderr)
        return 1
    print(f"{len(pairs)} questions answered by the teacher, cached in {cache_dir() / 'teacher-chats'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
