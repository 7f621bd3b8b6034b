"""The engine loop on a background thread, driven from asyncio (the server's interface).

Commands (add, abort) go to the loop through a queue, so the scheduler is only ever touched by
the loop thread; deltas come back to each request's asyncio.Queue with call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from .config import EngineArgs
from .input_processor import PreparedRequest
from .llm_engine import LLMEngine
from .outputs import EngineDead, EngineStats, QueueFull, StreamDelta
from .prompt_logprobs import PromptLogprobs, prompt_logprobs
from .sampling_params import SamplingParams

log = logging.getLogger("attamba.engine")


class AsyncEngine:
    """Runs `LLMEngine.step()` continuously on a thread; `generate()` streams one request's deltas."""

    def __init__(self, args: EngineArgs) -> None:
        self.engine = LLMEngine(args)
        self.model_name = self.engine.model_name
        self.model_config = self.engine.config
        self.tokenizer = self.engine.tokenizer
        self.max_model_len = self.engine.max_model_len
        self.max_waiting = args.max_waiting
        self._scoring_lock = threading.Lock()  # one prompt-logprobs forward at a time, beside the loop
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # sequences queued as commands, not yet in the scheduler
        self._pending_lock = threading.Lock()
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
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.engine.encode_prompt(prompt)

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> PreparedRequest:
        """Validate a request once (ValueError / ContextLengthExceeded when it can never run)."""
        return self.engine.prepare(prompt, params)

    async def generate(self, request_id: str, request: PreparedRequest) -> AsyncIterator[StreamDelta]:
        """Stream the deltas of all n completions; leaving early aborts the request."""
        if not self.is_alive:
            raise EngineDead("the engine is not running")
        params = request.params
        if self._stats.num_waiting + self._pending + params.n > self.max_waiting:
            raise QueueFull("the waiting queue is full, retry later")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        out: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), out)
        with self._pending_lock:
            self._pending += params.n
        self._send(("add", request_id, request))
        remaining = params.n
        try:
            while remaining:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
        finally:
            self._streams.pop(request_id, None)
            if remaining:
                self.abort(request_id)

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> PromptLogprobs:
        """Logprobs of the prompt's tokens (see `engine.prompt_logprobs`), computed off the event loop."""
        def score() -> PromptLogprobs:
            with self._scoring_lock:
                return prompt_logprobs(self.engine.model, prompt_ids, top, self.engine.device)

        return await asyncio.to_thread(score)

    def abort(self, request_id: str) -> None:
        """Abort a request; its cache is freed by the loop before its next step."""
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    # ---- the loop thread ----------------------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item: StreamDelta | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, out = target
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone
                pass

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, request = cmd
                with self._pending_lock:
                    self._pending -= request.params.n
                try:
                    self.engine.add_request(rid, request)
                except ValueError as exc:  # a duplicate request id
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
