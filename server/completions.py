"""POST /v1/completions: a prompt or a batch of them, n choices each, streamed as SSE or answered as one JSON
object. Choice i*n+j is completion j of prompt i (as vLLM and OpenAI number them)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from engine.outputs import StreamDelta
from server.generation import GenerationBatch, unless_disconnected
from server.protocol import (
    CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse,
)
from server.serving import Serving
from server.sse import DONE, SSEResponse, event, guard, usage


async def create_completion(serving: Serving, req: CompletionRequest, request: Request) -> Response:
    params = serving.sampling_params(req, req.max_tokens, req.logprobs)
    batch = await serving.admit(request, "cmpl", req.prompts, params, "prompt")
    if req.stream:
        return SSEResponse(guard(_stream(serving, batch, req)))
    choices = await unless_disconnected(request, _collect(serving, batch, req))
    body = CompletionResponse(id=batch.request_id, model=serving.model_name, choices=choices, usage=usage(batch))
    return JSONResponse(body.model_dump())


async def _echoes(serving: Serving, batch: GenerationBatch, req: CompletionRequest) -> dict[int, CompletionChoice]:
    """With `echo`, each choice's start: its prompt's text (and, with logprobs, the prompt's logprobs)."""
    if not req.echo:
        return {}
    starts = {}
    for position, (prompt, gen) in enumerate(zip(req.prompts, batch.gens)):
        text = prompt if isinstance(prompt, str) else serving.engine.tokenizer.decode(gen.prompt_ids)
        logprobs = None
        if req.logprobs is not None:
            scored = await serving.engine.prompt_logprobs(gen.prompt_ids, req.logprobs)
            logprobs = serving.logprobs.prompt(gen.prompt_ids, scored)
        for j in range(req.n):
            index = position * req.n + j
            starts[index] = CompletionChoice(index=index, text=text, logprobs=logprobs)
    return starts


async def _stream(serving: Serving, batch: GenerationBatch, req: CompletionRequest) -> AsyncIterator[bytes]:
    base = CompletionChunk(id=batch.request_id, model=serving.model_name, choices=[])
    offsets: dict[int, int] = defaultdict(int)
    async with aclosing(batch.deltas()) as deltas:
        for index, start in (await _echoes(serving, batch, req)).items():
            offsets[index] = len(start.text)
            yield event(base.model_copy(update={"choices": [start]}))
        async for _, index, d in deltas:
            if not d.text and d.finish_reason is None and d.logprobs is None:
                continue
            logprobs = _logprobs(serving, d, index, offsets)
            choice = CompletionChoice(index=index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)
            yield event(base.model_copy(update={"choices": [choice]}))
    if req.include_usage:
        yield event(base.model_copy(update={"usage": usage(batch)}))
    yield DONE


async def _collect(serving: Serving, batch: GenerationBatch, req: CompletionRequest) -> list[CompletionChoice]:
    async with aclosing(batch.deltas()) as deltas:
        choices = await _echoes(serving, batch, req)
        offsets: dict[int, int] = defaultdict(int, {i: len(c.text) for i, c in choices.items()})
        async for _, index, d in deltas:
            choice = choices.setdefault(index, CompletionChoice(index=index, text=""))
            choice.text += d.text
            logprobs = _logprobs(serving, d, index, offsets)
            if logprobs is not None:
                choice.logprobs = choice.logprobs.model_copy(deep=True).extend(logprobs) if choice.logprobs else logprobs
            choice.finish_reason = d.finish_reason or choice.finish_reason
    return [choices[i] for i in sorted(choices)]


def _logprobs(serving: Serving, delta: StreamDelta, index: int, offsets: dict[int, int]) -> CompletionLogprobs | None:
    """The delta's logprobs; advances its choice's text offset."""
    logprobs = serving.logprobs.completion(delta, offsets[index])
    if logprobs is not None:
        offsets[index] += sum(len(t) for t in logprobs.tokens)
    return logprobs

