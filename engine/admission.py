"""Admission: every rule that decides whether a request may enter the engine, in one place (as vLLM
v1's input processor validates once). What the engine queues afterwards is trusted.

Rules that hold at any moment are checked by `prepare` / `prepare_batch`, before anything is
queued, and raise InvalidRequest (or a subclass) naming the field at fault:
  prompt       non-empty, valid Unicode, token ids in the vocabulary            (InvalidPrompt)
  vocabulary   logit_bias keys and stop_token_ids in the vocabulary
  chunk size   a per-request chunk_size only where the model runs that P
  queue bound  n x prompts no more than the waiting queue can ever hold
  length       prompt + max_tokens within max_model_len                         (ContextLengthExceeded)
  cache fit    max_model_len itself is fitted to the cache here, once, so every request within it fits
The queue bound also holds live: `admit` is called where the queue is, at the moment requests join
it, with the number of sequences waiting then, and raises QueueFull when they do not fit beside them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from models.config import ModelConfig
from models.tokenizer import Tokenizer

from .config import fit_max_model_len
from .errors import ContextLengthExceeded, InvalidPrompt, InvalidRequest, QueueFull
from .sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request: prompt token ids and the resolved completion budget."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens, or what max_model_len leaves after the prompt


class AdmissionGate:
    """The engine's limits and the rules that apply them. `fits(n)`: whether one sequence of n tokens
    can ever fit the cache (asked only while resolving max_model_len)."""

    def __init__(self, tokenizer: Tokenizer, config: ModelConfig, max_waiting: int, max_model_len: int | None,
                 fits: Callable[[int], bool]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = config.vocab_size
        self.kind = config.kind
        self.chunk_size = config.chunk_size if config.kind == "attamba" else None  # the P served, if any
        self.max_waiting = max_waiting
        self.max_model_len = fit_max_model_len(max_model_len, config.default_max_model_len, fits)

    # ---- rules that hold at any moment -----------------------------------------------------------------
    def encode(self, prompt: Prompt, param: str = "prompt") -> list[int]:
        """Token ids of a text or token-id prompt; `param` names the request field it came from."""
        try:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        except ValueError as exc:  # text that is not valid Unicode
            raise InvalidPrompt(str(exc), param) from exc
        if not ids:
            raise InvalidPrompt("prompt is empty", param)
        if not all(self._in_vocab(t) for t in ids):
            raise InvalidPrompt(f"prompt token ids must be integers in [0, {self.vocab_size})", param)
        return ids

    def prepare(self, prompt: Prompt, params: SamplingParams, param: str = "prompt") -> PreparedRequest:
        """One request, checked by every rule that holds at any moment."""
        return self.prepare_batch([prompt], params, param)[0]

    def prepare_batch(self, prompts: Sequence[Prompt], params: SamplingParams,
                      param: str = "prompt") -> list[PreparedRequest]:
        """Prompts that share `params` and are admitted together (one HTTP request), checked by every
        rule that holds at any moment, with max_tokens resolved; `param` names the prompts' field."""
        if not prompts:
            raise InvalidPrompt("prompt is empty", param)
        ids = [self.encode(p, param) for p in prompts]
        sequences = len(ids) * params.n
        if not self.has_room(0, sequences):
            raise InvalidRequest(f"n ({params.n}) x {len(ids)} prompt(s) = {sequences} sequences is more than the "
                                 f"waiting queue holds ({self.max_waiting}): such a request could never be admitted",
                                 "n")
        self._check_params(params)
        return [PreparedRequest(i, params, self._max_tokens(i, params, param)) for i in ids]

    def _in_vocab(self, token: object) -> bool:
        return isinstance(token, int) and not isinstance(token, bool) and 0 <= token < self.vocab_size

    def _check_params(self, params: SamplingParams) -> None:
        if params.chunk_size is not None and params.chunk_size != self.chunk_size:
            served = (f"chunk_size applies to attamba models only, this one is {self.kind!r}" if self.chunk_size is None
                      else f"this engine runs P = {self.chunk_size} (per-request P is not supported; start with "
                           "--chunk-size)")
            raise InvalidRequest(f"chunk_size {params.chunk_size} is not served here: {served}", "chunk_size")
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not self._in_vocab(t)]
            if bad:
                raise InvalidRequest(f"{name} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
                                     name)

    def _max_tokens(self, prompt_ids: list[int], params: SamplingParams, param: str) -> int:
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_ids)
        if max_tokens < 1 or len(prompt_ids) + max_tokens > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{len(prompt_ids)} prompt + {max(max_tokens, 1)} completion tokens", param)
        return max_tokens

    # ---- the live rule ---------------------------------------------------------------------------------
    def has_room(self, waiting: int, sequences: int) -> bool:
        """Whether `sequences` more fit the waiting queue beside the `waiting` ones."""
        return waiting + sequences <= self.max_waiting

    def admit(self, waiting: int, sequences: int) -> None:
        """QueueFull unless `sequences` more fit beside the `waiting` ones, counted now (call it where the
        queue is, as the requests join it)."""
        if not self.has_room(waiting, sequences):
            raise QueueFull(f"the waiting queue is full ({waiting} of {self.max_waiting} sequences wait, the request "
                            f"adds {sequences}), retry later")
