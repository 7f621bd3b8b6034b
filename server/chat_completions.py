"""POST /v1/chat/completions: messages rendered with the chat template, n choices, SSE or JSON."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from server.errors import APIError
from server.generation import Generation, unless_disconnected
from server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
    ChatDelta, ChatLogprobs,
)
from server.serving import Serving
from server.sse import DONE, SSEResponse, event, guard, usage


async def create_chat_completion(serving: Serving, req: ChatCompletionRequest, request: Request) -> Response:
    serving.check_model(req.model)
    template = serving.chat_template
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(req, req.output_limit, logprobs, template.stop, template.stop_token_ids)
    try:
        prompt = template.render([("system" if m.role == "developer" else m.role, m.text) for m in req.messages])
    except ValueError as exc:  # a Jinja2 template's raise_exception
        raise APIError(400, str(exc), "invalid_value", "messages") from exc
    gen = await serving.admit(request, "chatcmpl", prompt, params, "messages")
    if req.stream:
        return SSEResponse(guard(_stream(serving, gen, req)))
    choices = await unless_disconnected(request, _collect(serving, gen))
    body = ChatCompletionResponse(id=gen.request_id, model=serving.model_name, choices=choices, usage=usage(gen))
    return JSONResponse(body.model_dump())


async def _stream(serving: Serving, gen: Generation, req: ChatCompletionRequest) -> AsyncIterator[bytes]:
    base = ChatCompletionChunk(id=gen.request_id, model=serving.model_name, choices=[])

    def chunk(choice: ChatChunkChoice) -> bytes:
        return event(base.model_copy(update={"choices": [choice]}))

    for index in range(req.n):
        yield chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")))
    async with aclosing(gen.deltas()) as deltas:
        async for d in deltas:
            if not d.text and d.finish_reason is None and d.logprobs is None:
                continue
            delta = ChatDelta(content=d.text or None)
            yield chunk(ChatChunkChoice(index=d.index, delta=delta, logprobs=serving.logprobs.chat(d),
                                        finish_reason=d.finish_reason))
    if req.include_usage:
        yield event(base.model_copy(update={"usage": usage(gen)}))
    yield DONE


async def _collect(serving: Serving, gen: Generation) -> list[ChatChoice]:
    choices: dict[int, ChatChoice] = {}
    async with aclosing(gen.deltas()) as deltas:
        async for d in deltas:
            choice = choices.setdefault(d.index, ChatChoice(index=d.index, message=AssistantMessage(content="")))
            choice.message.content += d.text
            logprobs = serving.logprobs.chat(d)
            if logprobs is not None:
                choice.logprobs = ChatLogprobs(content=(choice.logprobs.content if choice.logprobs else [])
                                               + logprobs.content)
            choice.finish_reason = d.finish_reason or choice.finish_reason
    return [choices[i] for i in sorted(choices)]
