"""Token logprobs in the two OpenAI shapes: legacy completions and chat."""
from __future__ import annotations

from functools import lru_cache
from itertools import accumulate

from engine.outputs import StreamDelta
from engine.prompt_logprobs import PromptLogprobs
from models.tokenizer import Tokenizer
from server.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class LogprobFormatter:
    """Turns a delta's (token id, logprob, top alternatives) into response objects."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.token_text = lru_cache(maxsize=65536)(lambda token_id: tokenizer.decode([token_id]))

    def completion(self, delta: StreamDelta, offset: int) -> CompletionLogprobs | None:
        """Legacy shape; `offset` is where the delta's first token starts in the completion text."""
        if delta.logprobs is None:
            return None
        tokens = [self.token_text(t) for t in delta.token_ids]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = [{self.token_text(t): lp for t, lp in alts} for alts in delta.top_logprobs or []]
        return CompletionLogprobs(tokens=tokens, token_logprobs=delta.logprobs, top_logprobs=top, text_offset=offsets)

    def prompt(self, prompt_ids: list[int], scored: PromptLogprobs) -> CompletionLogprobs:
        """Legacy shape for an echoed prompt (its first token has no logprob), starting at offset 0."""
        tokens = [self.token_text(t) for t in prompt_ids]
        offsets = [0, *accumulate(len(t) for t in tokens)][:-1]
        top = [None if alts is None else {self.token_text(t): lp for t, lp in alts} for alts in scored.top_logprobs]
        return CompletionLogprobs(tokens=tokens, token_logprobs=scored.logprobs, top_logprobs=top, text_offset=offsets)

    def chat(self, delta: StreamDelta) -> ChatLogprobs | None:
        if delta.logprobs is None:
            return None
        tops = delta.top_logprobs or [[] for _ in delta.token_ids]
        return ChatLogprobs(content=[
            TokenLogprob(**self._entry(token_id, lp), top_logprobs=[TopLogprob(**self._entry(t, a)) for t, a in alts])
            for token_id, lp, alts in zip(delta.token_ids, delta.logprobs, tops)
        ])

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
