"""Structured output: a grammar per request, a matcher per sequence, applied as a token mask.

Grammars are compiled by llguidance (the grammar engine behind vLLM's `guidance` backend): a
Rust library with an abi3 wheel and no Python dependencies, so it installs beside any torch.
JSON schemas are compiled without optional whitespace, so the grammar alone bounds the output
of a schema with bounded strings and numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import torch
from torch import Tensor

from models.tokenizer import Tokenizer

GuideKind = Literal["json", "json_object", "regex", "choice", "grammar"]
_COMPACT = {"whitespace_flexible": False}


@dataclass(frozen=True, slots=True)
class GuidedDecoding:
    """What a completion must match: a JSON schema, any JSON object, a regex, one of some strings,
    or a Lark grammar. `grammar` is the compiled llguidance grammar; construction raises ValueError
    (naming `param`, the request field it came from) when the spec does not compile."""

    kind: GuideKind
    spec: Any = None
    param: str = "response_format"
    grammar: str = ""

    def __post_init__(self) -> None:
        try:
            grammar = _compile(self.kind, self.spec)
            error = llguidance.LLMatcher.validate_grammar(grammar)
        except (TypeError, ValueError) as exc:  # a spec that is not JSON-serialisable or UTF-8 encodable
            error = str(exc)
        if error:
            raise ValueError(f"{self.param} is not a valid {self.kind} grammar: {error.strip()}")
        object.__setattr__(self, "grammar", grammar)


def _compile(kind: GuideKind, spec: Any) -> str:
    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=_COMPACT)
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_COMPACT)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        if not spec or not all(isinstance(c, str) for c in spec):
            raise ValueError("a choice needs a non-empty list of strings")
        return llguidance.grammar_from("choice", json.dumps(spec))
    return llguidance.LLMatcher.grammar_from_lark(spec)


class GuideFactory:
    """Makes one matcher per guided sequence and computes a batch's masks in parallel."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size
        self.lltokenizer = llguidance.LLTokenizer(tokenizer.hf.to_str(), n_vocab=vocab_size, eos_token=eos_token_id)
        self.executor = llguidance.LLExecutor()

    def matcher(self, guided: GuidedDecoding) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.lltokenizer, guided.grammar, log_level=0)

    def allowed(self, matchers: list[llguidance.LLMatcher]) -> Tensor:
        """[len(matchers), vocab_size] bool: the tokens each matcher allows next."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                              words * 4, len(matchers))
        bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # [B, words, 32], little-endian
        return bits.reshape(len(matchers), words * 32)[:, : self.vocab_size].bool()

    @staticmethod
    def advance(matcher: llguidance.LLMatcher, token_id: int) -> None:
        """Feed the sampled token; once the grammar is complete only EOS is allowed, which ends the output."""
        if not matcher.is_stopped():
            matcher.consume_token(token_id)
