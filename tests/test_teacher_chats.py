"""The teacher's own chat answers (training/teacher_chats.py): questions clear of the evaluation, generated once,
then read from a hash-checked cache; the mixture draws half its chats from them."""
from __future__ import annotations

import json
import re

import pytest
import torch

import training.teacher_chats as tc
from models.tokenizer import Tokenizer
from server.chat import ChatTemplate
from training.data import DataError
from training.long_eval import load_chat_set
from training.mixture import Mixture, MixtureConfig

from conftest import SAMPLE, make_checkpoint


def test_questions_stay_clear_of_the_chat_evaluation() -> None:
    asked = tc.questions()
    assert len(asked) == len(set(asked)) == len(tc.TOPICS) * len(tc.TEMPLATES) >= 200
    items = load_chat_set()
    answers = {a.lower() for item in items for a in item["answers"]}
    for q in asked:
        words = set(re.findall(r"[\w']+", q.lower()))
        assert not [a for a in answers if a in words or (" " in a and a in q.lower())], q
    assert not {item["question"].lower() for item in items} & {q.lower() for q in asked}


def test_answers_are_generated_once_then_read_back_and_checked(tmp_path, tokenizer_file, monkeypatch) -> None:
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path / "cache"))
    teacher = make_checkpoint(tmp_path, tokenizer_file, "transformer")
    asked = ["What is a bicycle?", "Describe chess in two sentences."]
    pairs = tc.teacher_chats(teacher, asked, max_tokens=4)
    assert [q for q, _ in pairs] == asked and all(isinstance(a, str) for _, a in pairs)
    monkeypatch.setattr(tc, "generate", lambda *a: pytest.fail("generated again"))
    assert tc.teacher_chats(teacher, asked, max_tokens=4) == pairs  # from the cache
    path = tc.cache_file(teacher, asked, 4)
    data = json.loads(path.read_text())
    data["pairs"][0][1] = "edited"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="fails its check"):
        tc.teacher_chats(teacher, asked, max_tokens=4)
    assert tc.main(["--teacher", str(tmp_path / "nope")]) == 1


def test_the_mixture_draws_half_its_chats_from_the_teachers_answers(tokenizer_file) -> None:
    tok = Tokenizer.from_file(tokenizer_file)
    ids = torch.tensor(tok.encode(SAMPLE.read_text()))
    chat = ChatTemplate("", tok)
    mix = Mixture(MixtureConfig(256, 1.0, 0.0, 1.0), tok, ids, [("Alpha", "Alpha is the first letter.")],
                  lambda m: chat.render(m, add_generation_prompt=False), torch.Generator().manual_seed(0),
                  answered=[("What is a bicycle?", "A bicycle has two wheels.")])
    text = "".join(tok.decode(mix.chat()[0]) for _ in range(4))
    assert text.count("A bicycle has two wheels.") > 2 and text.count("Alpha is the first letter.") > 2
