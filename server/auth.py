"""ASGI middleware that demands `Authorization: Bearer <key>` on the API routes before anything else runs,
so a request without the key gets 401 whatever its body holds."""
from __future__ import annotations

import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

PROTECTED = ("/v1/", "/tokenize", "/detokenize")  # /, /health and /metrics stay open


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"].startswith(PROTECTED):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key):
                response = error_response(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                                          "invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
