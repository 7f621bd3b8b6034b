"""Server-Sent Events: `data: {json}\\n\\n` chunks, then `data: [DONE]\\n\\n`."""
from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import APIError, error_event
from server.generation import Generation
from server.protocol import Usage

DONE = b"data: [DONE]\n\n"


def event(chunk: BaseModel) -> bytes:
    return f"data: {chunk.model_dump_json()}\n\n".encode()


def usage(gen: Generation) -> Usage:
    completion = gen.total_completion_tokens
    return Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=completion,
                 total_tokens=gen.prompt_tokens + completion)


async def guard(events: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """Pass events through (closing them when closed); an error after the stream has started
    (the engine dying) ends it with an error event."""
    async with aclosing(events):
        try:
            async for chunk in events:
                yield chunk
        except APIError as exc:
            yield error_event(exc)
            yield DONE


class SSEResponse(StreamingResponse):
    """A stream whose generator is closed as soon as the response ends, so a client that leaves
    mid-stream (the send is cancelled while the generator waits at a yield) aborts its request now."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncGenerator[bytes, None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()
