"""Offline batched generation: the same engine the server drives, run to completion."""
from __future__ import annotations

import itertools

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
        """Generate for every prompt (text or token ids); results in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        requests = []
        for prompt, p in zip(prompts, params_list):
            rid = f"offline-{next(self._ids)}"
            requests.append((rid, self.engine.add_request(rid, prompt, p)))
        while self.engine.has_unfinished():
            self.engine.step()
        return [RequestOutput(rid, seqs[0].prompt_ids, [self._completion(s) for s in seqs]) for rid, seqs in requests]

    @staticmethod
    def _completion(seq) -> CompletionOutput:
        want = seq.params.logprobs is not None
        return CompletionOutput(seq.index, seq.text, list(seq.output_ids), seq.finish_reason,
                                seq.logprobs if want else None, seq.top_logprobs if want else None)
