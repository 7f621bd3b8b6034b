"""POST /v1/completions: one prompt, n choices, streamed as SSE or answered as one JSON object."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from engine.outputs import StreamDelta
from server.errors import APIError
from server.generation import Generation, unless_disconnected
from server.protocol import (
    CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest, CompletionResponse,
)
from server.serving import Serving
from server.sse import DONE, SSEResponse, event, guard, usage


def _prompt(req: CompletionRequest) -> str | list[int]:
    if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
        if len(req.prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", "invalid_value", "prompt")
        return req.prompt[0]
    return req.prompt


async def create_completion(serving: Serving, req: CompletionRequest, request: Request) -> Response:
    serving.check_model(req.model)
    params = serving.sampling_params(req, req.max_tokens, req.logprobs)
    gen = await serving.admit(request, "cmpl", _prompt(req), params, "prompt")
    if req.stream:
        return SSEResponse(guard(_stream(serving, gen, req)))
    choices = await unless_disconnected(request, _collect(serving, gen))
    body = CompletionResponse(id=gen.request_id, model=serving.model_name, choices=choices, usage=usage(gen))
    return JSONResponse(body.model_dump())


async def _stream(serving: Serving, gen: Generation, req: CompletionRequest) -> AsyncIterator[bytes]:
    base = CompletionChunk(id=gen.request_id, model=serving.model_name, choices=[])
    offsets: dict[int, int] = defaultdict(int)
    async with aclosing(gen.deltas()) as deltas:
        async for d in deltas:
            if not d.text and d.finish_reason is None and d.logprobs is None:
                continue
            logprobs = _logprobs(serving, d, offsets)
            choice = CompletionChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason)
            yield event(base.model_copy(update={"choices": [choice]}))
    if req.include_usage:
        yield event(base.model_copy(update={"usage": usage(gen)}))
    yield DONE


async def _collect(serving: Serving, gen: Generation) -> list[CompletionChoice]:
    choices: dict[int, CompletionChoice] = {}
    offsets: dict[int, int] = defaultdict(int)
    async with aclosing(gen.deltas()) as deltas:
        async for d in deltas:
            choice = choices.setdefault(d.index, CompletionChoice(index=d.index, text=""))
            choice.text += d.text
            logprobs = _logprobs(serving, d, offsets)
            if logprobs is not None:
                choice.logprobs = choice.logprobs.extend(logprobs) if choice.logprobs else logprobs
            choice.finish_reason = d.finish_reason or choice.finish_reason
    return [choices[i] for i in sorted(choices)]


def _logprobs(serving: Serving, delta: StreamDelta, offsets: dict[int, int]) -> CompletionLogprobs | None:
    """The delta's logprobs; advances its choice's text offset."""
    logprobs = serving.logprobs.completion(delta, offsets[delta.index])
    if logprobs is not None:
        offsets[delta.index] += sum(len(t) for t in logprobs.tokens)
    return logprobs
