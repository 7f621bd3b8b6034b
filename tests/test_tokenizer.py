"""Byte-level BPE tokenizer: training, lossless round trips, streaming detokenization."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from models.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, IncrementalDecoder, Tokenizer, train_tokenizer


TRICKY = [
    "",
    "a",
    " leading space",
    "trailing space ",
    "multiple   spaces\tand\ttabs",
    "\n",
    "\n\nnewlines\n\n\n",
    " \n = Heading = \n \n",
    "\r\nwindows line ends\r\n",
    "Zürich, São Paulo, Ōsaka, Kraków",
    "Ελληνικά кириллица 中文字符 日本語のテキスト 한국어",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flags 🇫🇷🇯🇵",
    "combining e\u0301 and zero\u200bwidth",
    "math ∑∫√∞ ≠ ≤ ± °C −17 @.@ 3",
    "replacement char \ufffd inside",
    "<|endoftext|> special <|user|>hi<|assistant|>",
    "\x00\x01\x7f control bytes",
]


def test_train_is_fast_and_sized(sample: str) -> None:
    t0 = time.perf_counter()
    hf = train_tokenizer(sample, vocab_size=512)
    assert time.perf_counter() - t0 < 5.0
    assert hf.get_vocab_size() == 512


def test_special_tokens(tok: Tokenizer) -> None:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(SPECIAL_TOKENS)
    assert tok.eos_token_id == tok.token_to_id(EOS_TOKEN)
    assert tok.token_to_id("<|not a token|>") is None
    ids = tok.encode("<|user|>hi<|endoftext|>")
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.vocab_size == 512


def test_round_trip_sample(tok: Tokenizer, sample: str) -> None:
    ids = tok.encode(sample)
    assert len(ids) < len(sample.encode()) / 2
    assert tok.decode(ids) == sample


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_iterable_training_input_and_batch_encode(sample: str) -> None:
    lines = sample.splitlines(keepends=True)
    tok = Tokenizer(train_tokenizer(iter(lines), vocab_size=300))
    assert tok.vocab_size == 300
    assert tok.encode_batch(lines[:5]) == [tok.encode(line) for line in lines[:5]]


def test_save_and_load(tok: Tokenizer, tmp_path: Path, sample: str) -> None:
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    loaded = Tokenizer.from_file(path)
    assert loaded.fingerprint == tok.fingerprint
    assert loaded.encode(sample) == tok.encode(sample)
    assert loaded.eos_token_id == tok.eos_token_id


def test_missing_eos_rejected(sample: str) -> None:
    with pytest.raises(ValueError):
        Tokenizer(train_tokenizer(sample, vocab_size=300, special_tokens=("<|pad|>",)))


def _stream(dec: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("text", TRICKY)
def test_incremental_matches_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = _stream(tok.incremental_decoder(), ids)
    assert "".join(deltas) == tok.decode(ids) == text


def test_incremental_holds_back_partial_utf8(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # 4 bytes, not merged in a 512 vocab
    dec = tok.incremental_decoder()
    assert [dec.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.push(ids[-1]) == "😀"
    assert dec.flush() == ""
    deltas = _stream(tok.incremental_decoder(), tok.encode("ab😀cd 中文"))
    assert all("\ufffd" not in d for d in deltas)


def test_incremental_sample_deltas(tok: Tokenizer, sample: str) -> None:
    ids = tok.encode(sample[:3000])
    deltas = _stream(tok.incremental_decoder(), ids)
    assert "".join(deltas) == sample[:3000]
    assert sum(1 for d in deltas if d) > len(ids) // 2


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_random_ids(tok: Tokenizer, skip: bool) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, tok.vocab_size, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        deltas = _stream(tok.incremental_decoder(skip_special_tokens=skip), ids)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip).rstrip("\ufffd")


def test_stream_ending_inside_a_character_emits_none_of_it(tok: Tokenizer) -> None:
    dec = tok.incremental_decoder()
    partial = tok.encode("ab😀")[:-1]
    assert tok.decode(partial).endswith("\ufffd")
    assert "".join(dec.push(t) for t in partial) + dec.flush() == "ab"  # no U+FFFD for the cut character
    assert "".join(_stream(dec, tok.encode("ok"))) == "ok"  # flush reset the decoder


def test_lone_surrogates_are_a_value_error(tok: Tokenizer) -> None:
    for encode in (tok.encode, lambda text: tok.encode_batch(["fine", text])):
        with pytest.raises(ValueError, match="surrogate at character 1"):
            encode("a\ud800b")
