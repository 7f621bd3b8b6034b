"""Per-request sampling parameters (OpenAI / vLLM semantics)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import InvalidRequest
from engine.guided import GuidedDecoding

GREEDY_EPS = 1e-5
"""Temperatures below this are treated as greedy decoding."""

MAX_LOGPROBS = 20
"""Largest number of top logprobs a request may ask for."""

MAX_LOGIT_BIAS = 100.0
"""Largest magnitude of a logit_bias value (as OpenAI's)."""


def _require_int(name: str, value: object, minimum: int, param: str | None = None) -> None:
    """`param`: the request field `name` belongs to, when they differ."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an int, got {value!r}", param or name)
    if value < minimum:
        raise InvalidRequest(f"{name} must be >= {minimum}, got {value}", param or name)


def _require_float(name: str, value: object, param: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f"{name} must be a number, got {value!r}", param or name)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} must be finite, got {value}", param or name)
    return float(value)


@dataclass(slots=True)
class SamplingParams:
    """How to sample the completion(s) of one request.

    ``top_k`` of -1 or 0 disables top-k; ``max_tokens=None`` generates until the
    model's maximum length; ``logprobs=k`` returns the chosen token's logprob plus
    the top ``k`` alternatives (0 = chosen token only); ``chunk_size`` overrides
    the Attamba chunk size P for this request. After construction ``stop`` and
    ``stop_token_ids`` are always lists.

    As vLLM's: ``presence_penalty`` / ``frequency_penalty`` (in [-2, 2]) subtract per
    generated occurrence; ``repetition_penalty`` (> 0) divides positive logits (multiplies
    negative ones) of every token seen in prompt or output; ``logit_bias`` adds to token
    logits; ``min_tokens`` bans EOS and the stop tokens and ignores stop strings until that
    many tokens exist; ``include_stop_str_in_output`` keeps the matched stop string or stop
    token text; ``guided`` constrains the output to a grammar (with it, the grammar decides
    where the output ends, so neither ``ignore_eos`` nor ``min_tokens`` applies).

    An invalid value raises InvalidRequest naming its field; what depends on the model (token
    ids in the vocabulary, the chunk size, the length) is checked at admission (engine/admission.py).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    chunk_size: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    guided: GuidedDecoding | None = None

    def __post_init__(self) -> None:
        _require_int("n", self.n, 1)
        self.temperature = _require_float("temperature", self.temperature)
        if self.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}", "temperature")
        self.top_p = _require_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        _require_int("top_k", self.top_k, -1)
        self.min_p = _require_float("min_p", self.min_p)
        if not 0 <= self.min_p <= 1:
            raise InvalidRequest(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidRequest(f"seed must be an int or None, got {self.seed!r}", "seed")
        if self.max_tokens is not None:
            _require_int("max_tokens", self.max_tokens, 1)

        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest(f"stop must contain non-empty strings, got {s!r}", "stop")

        self.stop_token_ids = [] if self.stop_token_ids is None else list(self.stop_token_ids)
        for t in self.stop_token_ids:
            _require_int("stop_token_ids entries", t, 0, "stop_token_ids")

        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequest(f"ignore_eos must be a bool, got {self.ignore_eos!r}", "ignore_eos")
        if self.logprobs is not None:
            _require_int("logprobs", self.logprobs, 0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidRequest(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}", "logprobs")
        if self.chunk_size is not None:
            _require_int("chunk_size", self.chunk_size, 1)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _require_float(name, getattr(self, name))
            if not -2 <= value <= 2:
                raise InvalidRequest(f"{name} must be in [-2, 2], got {value}", name)
            setattr(self, name, value)
        self.repetition_penalty = _require_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise InvalidRequest(f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty")
        self.logit_bias = dict(self.logit_bias or {})
        for token, bias in self.logit_bias.items():
            _require_int("logit_bias keys", token, 0, "logit_bias")
            if not -MAX_LOGIT_BIAS <= _require_float("logit_bias values", bias, "logit_bias") <= MAX_LOGIT_BIAS:
                raise InvalidRequest(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}",
                                     "logit_bias")
        _require_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequest(f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
                                 "min_tokens")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise InvalidRequest(f"include_stop_str_in_output must be a bool, got {self.include_stop_str_in_output!r}",
                                 "include_stop_str_in_output")
        if self.guided is not None and (self.ignore_eos or self.min_tokens):
            field = "ignore_eos" if self.ignore_eos else "min_tokens"
            raise InvalidRequest(f"{field} cannot be combined with structured output: the grammar decides where "
                                 "the output ends", field)

    @property
    def penalized(self) -> bool:
        """Whether any repetition-style penalty applies."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        """Whether this request decodes greedily (temperature ~ 0)."""
        return self.temperature < GREEDY_EPS
