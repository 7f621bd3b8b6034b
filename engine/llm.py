"""Offline batched generation: the same engine the server drives, run to completion."""
from __future__ import annotations

import itertools
from collections import deque

from .config import EngineArgs
from .llm_engine import LLMEngine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """`LLM(model_dir, **engine_args).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str, **engine_args) -> None:
        self.engine = LLMEngine(EngineArgs(model=str(model), **engine_args))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in prompt order. A request that can
        never run raises InvalidRequest (engine/errors.py) before any is queued; more prompts than the
        waiting queue holds join it as it drains."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        prepared = [(f"offline-{next(self._ids)}", self.engine.gate.prepare(prompt, p))  # refusals before any queues
                    for prompt, p in zip(prompts, params_list)]
        pending, seqs = deque(prepared), {}
        while pending or self.engine.has_unfinished():
            while pending and self.engine.has_room(pending[0][1].params.n):  # the queue bound holds offline too
                rid, req = pending.popleft()
                seqs[rid] = self.engine.add_request(rid, req)
            self.engine.step()
        return [RequestOutput(rid, req.prompt_ids, [self._completion(s) for s in seqs[rid]]) for rid, req in prepared]

    @staticmethod
    def _completion(seq) -> CompletionOutput:
        want = seq.params.logprobs is not None
        return CompletionOutput(seq.index, seq.text, list(seq.output_ids), seq.finish_reason,
                                seq.logprobs if want else None, seq.top_logprobs if want else None)
