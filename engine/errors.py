"""What the engine refuses, typed. A refused request carries the request field at fault (`param`)
and an OpenAI-style `code`; its class says what a server answers (400 for InvalidRequest and its
subclasses, 429 for QueueFull), so nobody has to read a message to route an error."""
from __future__ import annotations


class RequestRejected(Exception):
    """A request the engine does not take. `param`: the field at fault (None: the request as a
    whole); `code`: an OpenAI-style error code."""

    code = "invalid_request"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(RequestRejected, ValueError):
    """The request can never run as sent (HTTP 400)."""

    code = "invalid_value"


class InvalidPrompt(InvalidRequest):
    """The prompt is empty, not valid Unicode, or holds token ids outside the vocabulary (HTTP 400)."""

    code = "invalid_prompt"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens is longer than the engine serves (HTTP 400)."""

    code = "context_length_exceeded"


class QueueFull(RequestRejected, RuntimeError):
    """The waiting queue cannot take the request now; it may later (HTTP 429 with Retry-After)."""

    code = "rate_limit_exceeded"


class EngineDead(RuntimeError):
    """The engine loop has stopped (HTTP 503)."""
