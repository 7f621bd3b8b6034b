"""The engine loop on a background thread, driven from asyncio (the server's interface).

Commands (add, abort) go to the loop through a queue, so the scheduler is only ever touched by
the loop thread, and admission's live rule (the waiting queue's bound) is decided there, on the
queue as it is when the requests join it; deltas and refusals come back to each request's
RequestStream with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from contextlib import aclosing
from typing import AsyncIterator

from .admission import PreparedRequest
from .config import EngineArgs
from .errors import EngineDead, QueueFull
from .llm_engine import LLMEngine
from .outputs import EngineStats, StreamDelta
from .prompt_logprobs import PromptLogprobs, prompt_logprobs

log = logging.getLogger("attamba.engine")


class RequestStream:
    """The deltas of one request's n completions, as the loop delivers them; a refusal (QueueFull)
    or the loop's death (EngineDead) is raised by the next `anext`. Closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, n: int) -> None:
        self.engine, self.request_id, self.remaining = engine, request_id, n
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamDelta:
        if not self.remaining:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.remaining = 0  # refused or dead: nothing left to abort
            raise item
        if item.finish_reason is not None:
            self.remaining -= 1
        return item

    async def aclose(self) -> None:
        self.engine._close(self)


class AsyncEngine:
    """Runs `LLMEngine.step()` continuously on a thread; `submit()` hands it requests and returns their
    streams. `gate` is the engine's admission gate (engine/admission.py): prepare requests with it."""

    def __init__(self, args: EngineArgs) -> None:
        self.engine = LLMEngine(args)
        self.gate = self.engine.gate
        self.model_name = self.engine.model_name
        self.model_config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self._scoring_lock = threading.Lock()  # one prompt-logprobs forward at a time, beside the loop
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stats = self.engine.stats()

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="attamba-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # ---- requests ---------------------------------------------------------------------------------------
    def submit(self, requests: dict[str, PreparedRequest]) -> list[RequestStream]:
        """Hand prepared requests to the loop, which admits them together: all, or none (then every
        stream raises QueueFull). Call it from the event loop that reads the streams."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        taken = [rid for rid in requests if rid in self._streams]
        if taken:
            raise ValueError(f"duplicate request id {taken[0]!r}")
        streams = [RequestStream(self, rid, req.params.n) for rid, req in requests.items()]
        self._streams.update((s.request_id, s) for s in streams)
        self._send(("add", requests))
        return streams

    async def generate(self, request_id: str, request: PreparedRequest) -> AsyncIterator[StreamDelta]:
        """Stream the deltas of one request's n completions; leaving early aborts it."""
        async with aclosing(self.submit({request_id: request})[0]) as stream:
            async for delta in stream:
                yield delta

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> PromptLogprobs:
        """Logprobs of the prompt's tokens (see `engine.prompt_logprobs`), computed off the event loop."""
        def score() -> PromptLogprobs:
            with self._scoring_lock:
                return prompt_logprobs(self.engine.model, prompt_ids, top, self.engine.device)

        return await asyncio.to_thread(score)

    def abort(self, request_id: str) -> None:
        """Abort a request; its cache is freed by the loop before its next step."""
        self._send(("abort", request_id))

    def _close(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
        if stream.remaining:
            stream.remaining = 0
            self.abort(stream.request_id)

    def stats(self) -> EngineStats:
        return self._stats

    # ---- the loop thread ----------------------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item: StreamDelta | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone
                pass

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                requests = cmd[1]
                try:
                    self.engine.add_requests(requests)
                except (QueueFull, ValueError) as exc:  # the queue is full now, or a duplicate request id
                    for rid in requests:
                        self._deliver(rid, exc)
            else:
                for delta in self.engine.abort_request(cmd[1]):  # a stream still open ends with "abort"
                    self._deliver(cmd[1], delta)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                if not self.engine.has_unfinished():
                    self._stats = self.engine.stats()
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                deltas = self.engine.step()
                self._stats = self.engine.stats()  # before delivery, so clients never see older numbers
                for delta in deltas:
                    self._deliver(delta.request_id, delta)
        except BaseException as exc:  # the engine is dead: fail every open stream
            log.exception("engine loop crashed")
            self._error = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDead(f"engine loop crashed: {exc}"))
        finally:
            for rid in list(self.engine.requests):
                for delta in self.engine.abort_request(rid):
                    self._deliver(rid, delta)
            self._stats = self.engine.stats()
