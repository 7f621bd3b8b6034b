"""What the engine hands back: final results (offline API) and streaming deltas (server)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One of the n completions of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[float] | None = None  # chosen-token logprobs, when requested
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class RequestOutput:
    """Final result of a request; .text/.token_ids/.finish_reason are those of completion 0."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


@dataclass
class StreamDelta:
    """New output of one completion since the previous delta (streaming)."""

    request_id: str
    index: int  # which of the n completions
    text: str  # new text (stop strings held back until resolved)
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None  # set on the completion's last delta
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far by this completion
    first_token_time: float | None = None  # monotonic time the first token was produced


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health."""

    num_running: int = 0
    num_waiting: int = 0
    cache_bytes_total: int = 0
    cache_bytes_used: int = 0
    cache_bytes_full_kv_equivalent: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up at admission (as vLLM's)
    prefix_cache_hits: int = 0  # of those, tokens resumed from the prefix cache
    prefix_cache_bytes: int = 0  # cached blocks and state snapshots, held or evictable

    @property
    def cache_usage(self) -> float:
        return self.cache_bytes_used / self.cache_bytes_total if self.cache_bytes_total else 0.0
