"""The FastAPI application: OpenAI-compatible routes, /health and /metrics around one AsyncEngine."""
from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from server.body_limit import BodyLimitMiddleware
from server.chat_completions import create_chat_completion
from server.completions import create_completion
from server.errors import APIError, install_error_handlers
from server.generation import ClientGone
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from server.serving import Serving

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

CLIENT_CLOSED = 499  # nginx's status for a client that left; nobody reads it


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _api_key_check(api_key: str | None) -> Callable[[Request], None]:
    """A dependency that demands `Authorization: Bearer <api_key>` when a key is set."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                           "invalid_api_key")

    return check


def create_app(engine: AsyncEngine, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               served_model_name: str | None = None) -> FastAPI:
    """The app for one engine; the caller starts and shuts down the engine."""
    app = FastAPI(title="attamba-serve", docs_url=None, redoc_url=None)
    app.state.serving = Serving(engine, served_model_name)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    install_error_handlers(app)
    app.add_exception_handler(ClientGone, lambda _, __: Response(status_code=CLIENT_CLOSED))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_key))])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(_serving(request), body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(_serving(request), body, request)

    @v1.get("/models")
    async def models(request: Request) -> ModelList:
        serving = _serving(request)
        card = ModelCard(id=serving.model_name, root=engine.model_name, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    app.include_router(v1)

    @app.get("/health")
    async def health(request: Request) -> Response:
        serving = _serving(request)
        if serving.lifecycle.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not engine.is_alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_serving(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
