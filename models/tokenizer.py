"""Byte-level BPE tokenizer (Hugging Face `tokenizers`): training, a thin wrapper, streaming detokenization."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|user|>", "<|assistant|>", "<|system|>")
_REPLACEMENT = "\ufffd"


def train_tokenizer(
    texts: Iterable[str] | str,
    vocab_size: int = 8192,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> tokenizers.Tokenizer:
    """Train a lossless byte-level BPE tokenizer; a single string is trained on line by line."""
    if isinstance(texts, str):
        texts = texts.splitlines(keepends=True)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def check_unicode(text: str) -> str:
    """`text` itself; ValueError when it cannot be encoded as UTF-8 (it holds a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode: lone surrogate at character {exc.start}") from None
    return text


class Tokenizer:
    """Wrapper around a `tokenizers.Tokenizer` exposing plain id lists, without any added BOS/EOS."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str = EOS_TOKEN) -> None:
        self.hf = tokenizer
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"tokenizer has no {eos_token!r} token")
        self.eos_token_id: int = eos_id

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer saved as tokenizers JSON."""
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Save as tokenizers JSON (creating parent directories)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer; identifies it in caches."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self.hf.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; ValueError when it is not valid Unicode (a lone surrogate)."""
        return self.hf.encode(check_unicode(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (encoded in parallel)."""
        texts = [check_unicode(t) for t in texts]
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A fresh streaming detokenizer."""
        return IncrementalDecoder(self, skip_special_tokens)


class IncrementalDecoder:
    """Streaming detokenizer: the deltas of push() and flush() concatenate to decode(ids), less
    any U+FFFD at its very end.

    Tokens are decoded together since the last point where the text ended on a complete
    character. A trailing U+FFFD may be an incomplete UTF-8 sequence that later tokens
    complete, so trailing U+FFFD characters are held back until a token resolves them; a
    stream that ends inside a character never emits its bytes.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending: list[int] = []
        self._emitted = 0  # characters of decode(_pending) already returned

    def push(self, token_id: int) -> str:
        """Add one token and return the text that is now safe to emit (possibly "")."""
        self._pending.append(token_id)
        text = self.tokenizer.decode(self._pending, self.skip_special_tokens)
        if text.endswith(_REPLACEMENT):
            stable = text.rstrip(_REPLACEMENT)
            delta = stable[self._emitted :]
            self._emitted = len(stable)
            return delta
        delta = text[self._emitted :]
        self._pending.clear()
        self._emitted = 0
        return delta

    def flush(self) -> str:
        """End of stream: return what is held back, except an incomplete trailing character, and reset."""
        text = self.tokenizer.decode(self._pending, self.skip_special_tokens).rstrip(_REPLACEMENT)
        delta = text[self._emitted :]
        self._pending.clear()
        self._emitted = 0
        return delta
