"""What the compressed cache keeps: long-context perplexity, pass-key recall and a factual chat set.

  long_ppl  perplexity of positions [start, length) in windows of `length` tokens cut from the
            concatenated WikiText-2 test articles: the positions where most of the context lies
            beyond the window, so only the chunk summaries (or full attention) can reach it
  passkey   a 5-digit key stated once at a random depth of n tokens of filler, then asked for; the
            fraction of trials whose greedy answer holds the key (the classic format of Mohtashami &
            Jaggi 2023; its filler and wording never appear in the training mixture)
  recall    held-out recall rows of the training mixture's own form (training/mixture.py; WikiText-2 *test*
            text or drill sentences as filler): does the student answer what it was trained to, and from how
            far back
  chat      plain factual questions (training/chat_eval.json) asked through the model's chat
            template, greedy; a reply is right when it contains one of the accepted answers
All generation runs through the cached decode path (models/state.py: prefill, decode_step).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from models.lm import LM
from models.state import decode_step, prefill
from models.tokenizer import Tokenizer

from .mixture import DRILL, Mixture, MixtureConfig

CHAT_SET = Path(__file__).with_name("chat_eval.json")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.\n")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_FACT = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@torch.no_grad()
def greedy_batch(model: LM, prompts: list[list[int]], n: int, batch_size: int = 4) -> list[list[int]]:
    """n greedy tokens after each prompt (right-padded prefill in batches, then cached decode steps)."""
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch_size):
        group = prompts[s : s + batch_size]
        lengths = torch.tensor([len(p) for p in group])
        ids = torch.zeros(len(group), int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(group):
            ids[i, : len(p)] = torch.tensor(p)
        logits, state = prefill(model, ids, lengths, reserve=n)
        tok = logits[torch.arange(len(group)), lengths - 1].argmax(-1)
        gen = [tok]
        for _ in range(n - 1):
            logits, state = decode_step(model, tok, state)
            tok = logits.argmax(-1)
            gen.append(tok)
        out += torch.stack(gen, 1).tolist()
    return out


@torch.no_grad()
def long_ppl(model: LM, ids: torch.Tensor, length: int, start: int, windows: int) -> dict:
    """Perplexity of positions [start, length) over `windows` consecutive windows of `length` + 1 tokens of ids."""
    if ids.numel() < windows * length + 1:
        raise ValueError(f"need {windows * length + 1} tokens for {windows} windows of {length}, have {ids.numel()}")
    nll, count = 0.0, 0
    for w in range(windows):
        seq = ids[w * length : (w + 1) * length + 1].long()[None]
        logits = model(seq[:, :-1])[0, start:]
        nll += float(F.cross_entropy(logits, seq[0, start + 1 :], reduction="sum"))
        count += length - start
    return {"ppl": float(torch.tensor(nll / count).exp()), "tokens": count, "length": length, "start": start}


def passkey_prompts(tokenizer: Tokenizer, n_filler: int, trials: int, seed: int) -> list[tuple[list[int], str, int]]:
    """(prompt ids, key, back) per trial: n_filler tokens of filler with the key sentence at a uniform random
    depth; back counts the tokens from the key sentence's start to the prompt's end."""
    rng = random.Random(seed)
    unit = tokenizer.encode(PASSKEY_FILLER)
    filler = (unit * (n_filler // len(unit) + 1))[:n_filler]
    intro, question = tokenizer.encode(PASSKEY_INTRO), tokenizer.encode(PASSKEY_QUESTION)
    out = []
    for _ in range(trials):
        key = str(rng.randint(10000, 99999))
        depth = rng.randint(0, n_filler)
        fact = tokenizer.encode(PASSKEY_FACT.format(key=key))
        ids = intro + filler[:depth] + fact + filler[depth:] + question
        out.append((ids, key, len(ids) - len(intro) - depth))
    return out


def passkey(model: LM, tokenizer: Tokenizer, n_filler: int, trials: int, seed: int = 0) -> dict:
    """Fraction of trials whose 8 greedy tokens contain the key; per trial how far back the key was and the reply."""
    cases = passkey_prompts(tokenizer, n_filler, trials, seed)
    replies = [tokenizer.decode(r) for r in greedy_batch(model, [p for p, _, _ in cases], 8)]
    hits = [key in r for (_, key, _), r in zip(cases, replies)]
    return {"filler_tokens": n_filler, "trials": trials, "recovered": sum(hits), "fraction": sum(hits) / trials,
            "cases": [{"back": back, "recovered": hit, "reply": r} for (_, _, back), hit, r in zip(cases, hits, replies)]}


def recall_row_prompts(tokenizer: Tokenizer, text_ids: torch.Tensor, rows: int, seq_len: int,
                       seed: int) -> list[tuple[list[int], str, int, bool]]:
    """(prompt ids, value, back, drill) per row: a recall row cut before its first answer; back counts the
    tokens from the value's latest statement to the prompt's end; drill when its filler is DRILL sentences."""
    mix = Mixture(MixtureConfig(seq_len, 0.0, 1.0, 1.0), tokenizer, text_ids, [], lambda m: "",
                  torch.Generator().manual_seed(seed))
    out = []
    while len(out) < rows:
        ids, _, answers = mix.recall()
        if True not in answers:  # no room for the task: the draw fell back to plain text
            continue
        j = answers.index(True)
        k = answers.index(False, j) if False in answers[j:] else len(answers)
        prompt, value = ids[: j + 1], tokenizer.decode(ids[j + 1 : k + 1]).strip()
        back = next(len(prompt) - i for i in range(len(prompt) - 1, -1, -1) if value in tokenizer.decode(prompt[i:]))
        text = tokenizer.decode(prompt)
        out.append((prompt, value, back, any(d in text for d in DRILL)))
    return out


def recall_rows(model: LM, tokenizer: Tokenizer, text_ids: torch.Tensor, rows: int, seq_len: int = 1024,
                seed: int = 12345, far: int = 90) -> dict:
    """Fraction of held-out recall rows whose 8 greedy tokens hold the stated value, overall and for values
    stated more than `far` tokens back (beyond a window of 64 plus its partial chunk)."""
    cases = recall_row_prompts(tokenizer, text_ids, rows, seq_len, seed)
    replies = [tokenizer.decode(r) for r in greedy_batch(model, [c[0] for c in cases], 8)]
    hits = [value in r for (_, value, _, _), r in zip(cases, replies)]
    beyond = [(h, c[3]) for h, c in zip(hits, cases) if c[2] > far]
    return {"rows": rows, "recovered": sum(hits), "beyond": len(beyond), "recovered_beyond": sum(h for h, _ in beyond),
            "drill_beyond": sum(d for _, d in beyond), "recovered_drill_beyond": sum(h for h, d in beyond if d),
            "cases": [{"back": c[2], "drill": c[3], "value": c[1], "recovered": h, "reply": r}
                      for c, h, r in zip(cases, hits, replies)]}


def load_chat_set(path: Path = CHAT_SET) -> list[dict]:
    """[{question, answers: [accepted substrings]}] from the repo's chat set."""
    items = json.loads(path.read_text())
    if not items or any(not it.get("question") or not it.get("answers") for it in items):
        raise ValueError(f"{path}: every item needs a question and accepted answers")
    return items


def chat_replies(model: LM, tokenizer: Tokenizer, render, items: list[dict], max_tokens: int = 48,
                 stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Greedy reply ids to each question through `render` (messages -> prompt text), cut at the first stop id."""
    prompts = [tokenizer.encode(render([("user", it["question"])])) for it in items]
    return [r[: next((i for i, t in enumerate(r) if t in stop_ids), len(r))]
            for r in greedy_batch(model, prompts, max_tokens)]


def answered(item: dict, reply: str) -> bool:
    """Whether a reply contains one of the item's accepted answers, case-insensitively."""
    return any(a.lower() in reply.lower() for a in item["answers"])


def chat_accuracy(model: LM, tokenizer: Tokenizer, render, items: list[dict], max_tokens: int = 48,
                  stop_ids: tuple[int, ...] = ()) -> dict:
    """The chat set's greedy replies (chat_replies), each right when `answered`."""
    replies = [tokenizer.decode(r).strip() for r in chat_replies(model, tokenizer, render, items, max_tokens, stop_ids)]
    right = [answered(it, rep) for it, rep in zip(items, replies)]
    return {"questions": len(items), "correct": sum(right), "fraction": sum(right) / len(items),
            "replies": [{"question": it["question"], "reply": rep, "correct": ok}
                        for it, rep, ok in zip(items, replies, right)]}
