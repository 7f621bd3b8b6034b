"""What both generation endpoints share: readiness, model names, request validation and admission."""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request

from engine.outputs import ContextLengthExceeded
from engine.sampling_params import SamplingParams
from server.chat import load_chat_template
from server.errors import APIError
from server.generation import Generation
from server.lifecycle import Lifecycle
from server.logprobs import LogprobFormatter
from server.metrics import Metrics
from server.protocol import SamplingRequest

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "chunk_size")
PARAMS = {*SAMPLING_FIELDS, "max_tokens", "logprobs", "stop", "stop_token_ids"}


def _param_of(exc: ValueError) -> str | None:
    """The request field an engine / SamplingParams error message starts with, if any."""
    first = str(exc).split(maxsplit=1)[0] if str(exc) else ""
    return first if first in PARAMS else None


class Serving:
    """The engine plus everything the handlers need to turn a request into a Generation."""

    def __init__(self, engine: AsyncEngine, served_model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = served_model_name or engine.model_name
        self.metrics = Metrics(engine, self.model_name)
        self.lifecycle = Lifecycle()
        self.chat_template = load_chat_template(engine.model_config, engine.tokenizer)
        self.logprobs = LogprobFormatter(engine.tokenizer)

    def check_ready(self) -> None:
        if self.lifecycle.draining:
            raise APIError(503, "the server is shutting down", "service_unavailable")
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running", "service_unavailable")

    def check_model(self, name: str | None) -> None:
        """Accept the served name and the checkpoint's own name (or no name at all)."""
        if name is not None and name not in (self.model_name, self.engine.model_name):
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")

    def sampling_params(self, req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                        extra_stop: list[str] | None = None, stop_token_ids: list[int] | None = None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        try:
            return SamplingParams(**{f: getattr(req, f) for f in SAMPLING_FIELDS}, max_tokens=max_tokens,
                                  logprobs=logprobs, stop=stop + (extra_stop or []), stop_token_ids=stop_token_ids)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value", _param_of(exc)) from exc

    async def admit(self, request: Request, prefix: str, prompt: str | list[int], params: SamplingParams,
                    prompt_param: str) -> Generation:
        """Validate the prompt against the model and start generating; every rejection is an APIError."""
        try:
            prompt_ids = self.engine.encode_prompt(prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_prompt", prompt_param) from exc
        self.check_ready()
        try:
            self.engine.check_request(prompt_ids, params)
            gen = Generation(self.engine, self.metrics, self.lifecycle, f"{prefix}-{uuid.uuid4().hex}", prompt_ids,
                             params)
            await gen.start(request)
        except ContextLengthExceeded as exc:
            raise APIError(400, str(exc), "context_length_exceeded", prompt_param) from exc
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value", _param_of(exc)) from exc
        return gen
