"""One sequence (one of a request's n completions): its tokens, progress and cache indices."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch

from models.tokenizer import IncrementalDecoder

from .sampling_params import SamplingParams


class SeqStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Tokens and progress of one completion. Holds cache indices only, never tensors."""

    request_id: str
    index: int  # which of the request's n completions
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what max_model_len leaves
    decoder: IncrementalDecoder
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose K/V and SSM state are in the cache
    block_table: list[int] = field(default_factory=list)  # cache blocks of boundary (or KV) entries
    slot: int = -1  # state slot (window ring, SSM and conv states), -1 when none
    # output state
    text: str = ""
    num_emitted_chars: int = 0  # text already streamed
    num_emitted_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    first_token_time: float | None = None
    guide: Any = None  # structured-output matcher (engine/guided.py), made by the sampler on first use

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        n = len(self.prompt_ids)
        return (self.prompt_ids[start:end] if start < n else []) + self.output_ids[max(0, start - n): max(0, end - n)]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
