"""Stage-2 training sequences: plain text, packed chats and synthetic recall tasks.

Every sequence is seq_len + 1 token ids with a loss weight per predicted token, so the three kinds
batch together:
  text    a random window of the corpus (weight 1 everywhere)
  chat    "Tell me about X"-style questions answered by X's Wikipedia lead, rendered with the
          teacher's chat template and packed back to back (weight 1); with the teacher's own answers to
          training/teacher_chats.py's questions, half the chats are those
  recall  filler with 1-4 facts ("Mara's locker number is 48213."; one form restates the value) at
          random depths, then a question about each at the end, either as "Question: ...\nAnswer:" or as the
          question followed by the start of its answer ("What is Mara's locker number? Mara's locker
          number is"), where a plain continuation competes with recall. Half the rows' filler is corpus text,
          half a few short plain sentences repeated ("drill" filler, where the window sees nothing but
          repetition and only the chunk summaries can hold the fact); the answer's tokens weigh `recall_weight`,
          so distillation from the teacher, which reads the fact back through full attention,
          teaches the chunk summaries to keep it. The templates, names and filler here are never
          those of the pass-key evaluation (training/long_eval.py), which stays unseen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from models.tokenizer import Tokenizer

KINDS = ("text", "chat", "recall")
Row = tuple[list[int], list[float], list[bool]]

QUESTIONS = ("Tell me about {}.", "What do you know about {}?", "Give me a short summary of {}.",
             "Can you explain what {} is?", "Write a few sentences about {}.")
NAMES = ("Mara", "Tobias", "Ingrid", "Kofi", "Lena", "Ravi", "Odile", "Hugo", "Sana", "Petra", "Dmitri", "Yuki",
         "Amara", "Felix", "Noor", "Bruno")
THINGS = ("locker", "room", "badge", "account", "ticket", "order", "parcel", "seat")
# (fact, question, the start of the answer that the value completes)
FACTS = (("{n}'s {t} number is {v}.", "What is {n}'s {t} number?", "{n}'s {t} number is"),
         ("Note that the {t} number of {n} is {v}.", "What is the {t} number of {n}?", "The {t} number of {n} is"),
         ("For the record, {n} was given {t} number {v}.", "Which {t} number was {n} given?",
          "{n} was given {t} number"),
         ("{n}'s {t} number is {v}. Keep it in mind. {v} is {n}'s {t} number.", "What is {n}'s {t} number?",
          "{n}'s {t} number is"))
DRILL = ("The river runs to the sea.", "Birds sing in the morning.", "The road is long and quiet.",
         "A cat sleeps by the door.", "Bread is baked at dawn.", "The hills are far away.", "Rain falls on the roof.",
         "The lamp is on.", "We walk and we rest.", "Snow covers the field.")


@dataclass(frozen=True)
class MixtureConfig:
    seq_len: int
    chat_frac: float
    recall_frac: float
    recall_weight: float


class Mixture:
    """Draws [B, T+1] id batches, [B, T] loss weights and [B, T] answer masks from `generator` (reproducible,
    resumable). A row is (ids, weights, answers): answers[j] marks a prediction of ids[j + 1] that is a recall
    answer's token, whose right value the row itself states."""

    def __init__(self, cfg: MixtureConfig, tokenizer: Tokenizer, text_ids: Tensor,
                 summaries: list[tuple[str, str]], render_chat: Callable[[list[tuple[str, str]]], str],
                 generator: torch.Generator, answered: list[tuple[str, str]] = ()) -> None:
        """summaries: (title, extract) pairs, asked about by QUESTIONS; answered: (question, answer) pairs (the
        teacher's own answers, training/teacher_chats.py), drawn for half the chats when given."""
        if text_ids.numel() <= 2 * cfg.seq_len:
            raise ValueError(f"need more than {2 * cfg.seq_len} corpus tokens, got {text_ids.numel()}")
        if cfg.chat_frac < 0 or cfg.recall_frac < 0 or cfg.chat_frac + cfg.recall_frac > 1:
            raise ValueError("chat_frac and recall_frac must be >= 0 and sum to at most 1")
        if cfg.chat_frac > 0 and not summaries:
            raise ValueError("chat examples need summaries")
        self.cfg, self.tok, self.ids, self.summaries, self.answered = cfg, tokenizer, text_ids, summaries, list(answered)
        self.render_chat, self.gen = render_chat, generator

    def _int(self, n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=self.gen))

    def _window(self, n: int) -> list[int]:
        start = self._int(self.ids.numel() - n)
        return self.ids[start : start + n].tolist()

    def _drill(self, n: int) -> list[int]:
        """n tokens of 2-5 DRILL sentences repeated."""
        picks = torch.randperm(len(DRILL), generator=self.gen)[: 2 + self._int(4)].tolist()
        unit = self.tok.encode(" " + " ".join(DRILL[i] for i in picks))
        return (unit * (n // len(unit) + 1))[:n]

    def text(self) -> Row:
        n = self.cfg.seq_len + 1
        return self._window(n), [1.0] * (n - 1), [False] * (n - 1)

    def chat(self) -> Row:
        ids: list[int] = []
        while len(ids) < self.cfg.seq_len + 1:
            if self.answered and self._int(2):
                question, answer = self.answered[self._int(len(self.answered))]
            else:
                title, answer = self.summaries[self._int(len(self.summaries))]
                question = QUESTIONS[self._int(len(QUESTIONS))].format(title)
            ids += self.tok.encode(self.render_chat([("user", question), ("assistant", answer)]))
        ids = ids[: self.cfg.seq_len + 1]
        return ids, [1.0] * (len(ids) - 1), [False] * (len(ids) - 1)

    def recall(self) -> Row:
        n_total = self.cfg.seq_len + 1
        facts, qa = [], []
        used: set[tuple[int, int]] = set()
        for _ in range(1 + self._int(4)):
            who = (self._int(len(NAMES)), self._int(len(THINGS)))
            if who in used:
                continue
            used.add(who)
            value = str(self._int(10 ** (3 + self._int(5))))  # 1 to 7 digits
            fact, question, stem = FACTS[self._int(len(FACTS))]
            names = dict(n=NAMES[who[0]], t=THINGS[who[1]], v=value)
            facts.append(self.tok.encode(" " + fact.format(**names) + " "))
            ask = (f"\nQuestion: {question.format(**names)}\nAnswer:" if self._int(2) else
                   f"\n{question.format(**names)} {stem.format(**names)}")
            qa.append((self.tok.encode(ask), self.tok.encode(f" {value}")))
        order = torch.randperm(len(qa), generator=self.gen).tolist()
        tail: list[int] = []
        answer_at: list[tuple[int, int]] = []  # (start, length) of each answer within the tail
        for i in order:
            tail += qa[i][0]
            answer_at.append((len(tail), len(qa[i][1])))
            tail += qa[i][1]
        n_filler = n_total - len(tail) - sum(map(len, facts))
        if n_filler < len(facts):
            return self.text()  # a very short seq_len leaves no room for the task
        filler = self._window(n_filler) if self._int(2) else self._drill(n_filler)
        cuts = sorted(self._int(int(n_filler * 0.9) + 1) for _ in facts)  # facts in the first 90 %
        ids: list[int] = []
        prev = 0
        for cut, fact in zip(cuts, facts):
            ids += filler[prev:cut] + fact
            prev = cut
        ids += filler[prev:]
        head = len(ids)
        ids += tail
        weights, answers = [1.0] * (n_total - 1), [False] * (n_total - 1)
        for start, length in answer_at:  # index j scores the prediction of ids[j + 1]
            for j in range(head + start - 1, head + start - 1 + length):
                weights[j], answers[j] = self.cfg.recall_weight, True
        return ids, weights, answers

    def example(self) -> Row:
        u = float(torch.rand((), generator=self.gen))
        if u < self.cfg.chat_frac:
            return self.chat()
        if u < self.cfg.chat_frac + self.cfg.recall_frac:
            return self.recall()
        return self.text()

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Endless (ids [B, T+1] long, weights [B, T] float, answers [B, T] bool) batches."""
        while True:
            rows = [self.example() for _ in range(batch_size)]
            yield (torch.tensor([r[0] for r in rows], dtype=torch.long),
                   torch.tensor([r[1] for r in rows], dtype=torch.float32),
                   torch.tensor([r[2] for r in rows], dtype=torch.bool))
