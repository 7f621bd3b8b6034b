"""One admitted request: drives the engine's delta stream, times it, and aborts it when the client leaves."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from engine.admission import PreparedRequest
from engine.errors import EngineDead, RequestRejected
from engine.outputs import StreamDelta
from server.errors import engine_error
from server.lifecycle import Lifecycle
from server.metrics import Metrics

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine, RequestStream

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it and raising ClientGone if the client disconnects first."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise ClientGone
    return work.result()


class Generation:
    """The delta stream of one submitted request, opened with `start()` and always closed with `close()`."""

    def __init__(self, engine: AsyncEngine, metrics: Metrics, lifecycle: Lifecycle, request: PreparedRequest,
                 stream: RequestStream) -> None:
        self.engine, self.lifecycle, self.request_id = engine, lifecycle, stream.request_id
        self.prompt_ids = request.prompt_ids
        self.prompt_tokens = len(request.prompt_ids)
        self.timer = metrics.track(request.params.n)
        self.completion_tokens: dict[int, int] = {}
        self._stream = stream
        self._first: StreamDelta | None = None
        self._closed = False
        lifecycle.enter(self)

    async def start(self, request: Request) -> None:
        """Wait for the first delta, so a refusal (QueueFull) or a dead engine propagates, to become an
        HTTP status (server/errors.py) before any body is sent; ClientGone if the client leaves first."""
        try:
            self._first = await unless_disconnected(request, anext(self._stream))
        except (RequestRejected, EngineDead):
            await self.close(admitted=False)
            raise
        except BaseException:
            await self.close()
            raise

    async def deltas(self) -> AsyncIterator[StreamDelta]:
        """Every delta, the prefetched first one included; closes the request when exhausted or closed."""
        try:
            if self._first is not None:
                yield self._record(self._first)
            async for delta in self._stream:
                yield self._record(delta)
        except EngineDead as exc:  # mid-stream: an APIError, which the SSE guard turns into an error event
            raise engine_error(exc) from exc
        finally:
            await self.close()

    def _record(self, delta: StreamDelta) -> StreamDelta:
        self.timer.observe(delta)
        self.completion_tokens[delta.index] = max(self.completion_tokens.get(delta.index, 0),
                                                  delta.completion_tokens)
        return delta

    @property
    def total_completion_tokens(self) -> int:
        return sum(self.completion_tokens.values())

    async def close(self, admitted: bool = True) -> None:
        """Abort whatever is unfinished (freeing its cache now) and settle the metrics; idempotent."""
        if self._closed:
            return
        self._closed = True
        if admitted and self.timer.unfinished:
            self.timer.close()
        self.lifecycle.exit(self)
        await self._stream.aclose()  # aborts what is unfinished

    def abort(self) -> None:
        """End the request early (server shutdown): its completions finish with reason "abort"."""
        self.engine.abort(self.request_id)


class GenerationBatch:
    """The Generations of one HTTP request (one per prompt), seen as one: choice i*n+j is completion j
    of prompt i, usage is summed."""

    def __init__(self, request_id: str, gens: list[Generation], n: int) -> None:
        self.request_id, self.gens, self.n = request_id, gens, n

    async def start(self, request: Request) -> None:
        """Start every prompt at once; if any fails, close them all and raise its error."""
        results = await asyncio.gather(*(g.start(request) for g in self.gens), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(g.close() for g in self.gens))
            raise failed[0]

    @property
    def prompt_tokens(self) -> int:
        return sum(g.prompt_tokens for g in self.gens)

    @property
    def total_completion_tokens(self) -> int:
        return sum(g.total_completion_tokens for g in self.gens)

    async def deltas(self) -> AsyncIterator[tuple[int, int, StreamDelta]]:
        """(prompt position, choice index, delta) as they come from all prompts; closing it closes all."""
        if len(self.gens) == 1:
            async with aclosing(self.gens[0].deltas()) as deltas:
                async for delta in deltas:
                    yield 0, delta.index, delta
            return
        queue: asyncio.Queue[tuple[int, StreamDelta | Exception | None]] = asyncio.Queue()

        async def pump(position: int, gen: Generation) -> None:
            try:
                async with aclosing(gen.deltas()) as deltas:
                    async for delta in deltas:
                        queue.put_nowait((position, delta))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait((position, exc))
                return
            queue.put_nowait((position, None))

        tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(self.gens)]
        try:
            remaining = len(tasks)
            while remaining:
                position, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield position, position * self.n + item.index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(g.close() for g in self.gens))
