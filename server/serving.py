"""What both generation endpoints share: readiness, model names, request resolution and admission.

A request is resolved into SamplingParams here and only here: every field is either applied,
or refused with a 400 that names it; none is accepted and ignored. What depends on the model or
the queue is decided by the engine's admission gate (engine/admission.py), whose typed errors
server/errors.py maps to HTTP.
"""
from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from starlette.requests import Request

from engine.guided import GuidedDecoding
from engine.sampling_params import SamplingParams
from server.chat import load_chat_template
from server.errors import APIError
from server.generation import Generation, GenerationBatch
from server.lifecycle import Lifecycle
from server.logprobs import LogprobFormatter
from server.metrics import Metrics
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingRequest

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "ignore_eos", "chunk_size",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
                   "include_stop_str_in_output")
GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _invalid(message: str, param: str | None) -> APIError:
    return APIError(400, message, "invalid_value", param)


def _refuse_unsupported(req: SamplingRequest) -> None:
    """Fields this server cannot honour: a 400 that names them, never a silent 200."""
    if req.best_of is not None and req.best_of != req.n:
        raise _invalid(f"best_of ({req.best_of}) must equal n ({req.n}): ranking extra samples is not "
                       "supported", "best_of")
    if req.stream_options is not None and not req.stream:
        raise _invalid("stream_options can only be set when stream is true", "stream_options")
    if isinstance(req, CompletionRequest) and req.suffix is not None:
        raise _invalid("suffix is not supported: this model does not fill in the middle", "suffix")
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise _invalid("top_logprobs requires logprobs to be true", "top_logprobs")
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        if choice != "none":
            raise _invalid(f"tool_choice {choice if isinstance(choice, str) else 'function'!r} is not supported: "
                           f"the model {req.model or ''} has no tool parser (send tool_choice 'none' or no tools)",
                           "tool_choice")


def _guided(req: SamplingRequest) -> GuidedDecoding | None:
    """The one structured-output constraint of a request: response_format or one of vLLM's guided_*."""
    asked = [(f, kind, getattr(req, f)) for f, kind in GUIDED_FIELDS.items() if getattr(req, f) is not None]
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise _invalid("response_format json_schema needs a json_schema object", "response_format")
        spec = fmt.json_schema.json_schema if fmt.type == "json_schema" else None
        asked.append(("response_format", "json" if fmt.type == "json_schema" else "json_object", spec))
    if len(asked) > 1:
        raise _invalid(f"only one of response_format and {', '.join(GUIDED_FIELDS)} may be set, got "
                       f"{', '.join(f for f, _, _ in asked)}", asked[1][0])
    if not asked:
        return None
    field, kind, spec = asked[0]
    try:
        return GuidedDecoding(kind, spec, field)
    except ValueError as exc:
        raise _invalid(str(exc), field) from exc


def _logit_bias(req: SamplingRequest) -> dict[int, float]:
    try:
        return {int(token): bias for token, bias in (req.logit_bias or {}).items()}
    except ValueError as exc:
        raise _invalid("logit_bias keys must be token ids (integers as strings)", "logit_bias") from exc


class Serving:
    """The engine plus everything the handlers need to turn a request into Generations."""

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

    def chat_prompt(self, messages: list[ChatMessage]) -> str:
        """The prompt text of a conversation; a 400 when the template refuses it (raise_exception)."""
        try:
            return self.chat_template.render([("system" if m.role == "developer" else m.role, m.text) for m in messages])
        except ValueError as exc:
            raise APIError(400, str(exc), "invalid_value", "messages") from exc

    def sampling_params(self, req: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                        extra_stop: list[str] | None = None, extra_stop_token_ids: list[int] | None = None
                        ) -> SamplingParams:
        """The request's SamplingParams; a 400 naming the field for anything invalid (InvalidRequest from
        SamplingParams, mapped by server/errors.py) or unsupported."""
        self.check_model(req.model)
        _refuse_unsupported(req)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return SamplingParams(**{f: getattr(req, f) for f in SAMPLING_FIELDS}, max_tokens=max_tokens,
                              logprobs=logprobs, stop=stop + (extra_stop or []),
                              stop_token_ids=(req.stop_token_ids or []) + (extra_stop_token_ids or []),
                              logit_bias=_logit_bias(req), guided=_guided(req))

    def encode(self, prompt: str | list[int], prompt_param: str) -> list[int]:
        """Token ids of a prompt (InvalidPrompt naming `prompt_param` when it cannot run)."""
        return self.engine.gate.encode(prompt, prompt_param)

    async def admit(self, request: Request, prefix: str, prompts: list[str | list[int]], params: SamplingParams,
                    prompt_param: str) -> GenerationBatch:
        """Check the prompts at the engine's admission gate, then submit them together and start them
        (one Generation each); a refusal propagates as the engine's typed error, and nothing keeps
        running after one."""
        prepared = self.engine.gate.prepare_batch(prompts, params, prompt_param)
        self.check_ready()
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        ids = [request_id] if len(prepared) == 1 else [f"{request_id}-{i}" for i in range(len(prepared))]
        streams = self.engine.submit(dict(zip(ids, prepared)))
        gens = [Generation(self.engine, self.metrics, self.lifecycle, req, stream)
                for req, stream in zip(prepared, streams)]
        batch = GenerationBatch(request_id, gens, params.n)
        await batch.start(request)
        return batch
