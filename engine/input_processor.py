"""Admission: a request is validated once, here, and its limits resolved once (as vLLM v1's
input processor). What the engine queues afterwards is trusted."""
from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig
from models.tokenizer import Tokenizer

from .cache_manager import CacheManager
from .outputs import ContextLengthExceeded
from .sampling_params import SamplingParams


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: prompt token ids and the resolved completion budget."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what max_model_len leaves after the prompt


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_model_len: int, cache: CacheManager,
                 max_waiting: int) -> None:
        self.tokenizer, self.config, self.max_model_len = tokenizer, config, max_model_len
        self.cache, self.max_waiting = cache, max_waiting

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text or token-id prompt; ValueError when empty or out of vocabulary."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError("prompt is empty")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.config.vocab_size for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {self.config.vocab_size})")
        return ids

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> PreparedRequest:
        """Validate and resolve; raises ValueError (ContextLengthExceeded for length) for a request
        that can never run."""
        ids = self.encode(prompt)
        if params.chunk_size is not None and params.chunk_size != self.config.chunk_size:
            raise ValueError(f"chunk_size {params.chunk_size} is not served here: this engine runs P = "
                             f"{self.config.chunk_size} (per-request P is not supported; start with --chunk-size)")
        params.check_vocab(self.config.vocab_size)
        if params.n > self.max_waiting:
            raise ValueError(f"n = {params.n} can never be admitted: the waiting queue holds {self.max_waiting}")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        total = len(ids) + max_tokens
        if max_tokens < 1 or total > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{len(ids)} prompt + {max(max_tokens, 1)} completion tokens")
        if not self.cache.fits_alone(total):
            raise ContextLengthExceeded(f"{total} tokens do not fit the cache ({self.cache.total_bytes} bytes)")
        return PreparedRequest(ids, params, max_tokens)
