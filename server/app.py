"""The FastAPI application: OpenAI-compatible routes, /health and /metrics around one AsyncEngine."""
from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from server.auth import APIKeyMiddleware
from server.body_limit import BodyLimitMiddleware
from server.chat_completions import create_chat_completion
from server.completions import create_completion
from server.errors import install_error_handlers
from server.generation import ClientGone
from server.playground import add_playground
from server.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
    TokenizeChatRequest, TokenizeCompletionRequest, TokenizeResponse,
)
from server.serving import Serving

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

CLIENT_CLOSED = 499  # nginx's status for a client that left; nobody reads it


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def create_app(engine: AsyncEngine, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               served_model_name: str | None = None, allowed_origins: list[str] | None = None,
               ui: bool = True) -> FastAPI:
    """The app for one engine; the caller starts and shuts down the engine. `allowed_origins` turns on
    CORS for those origins ("*" for any); `ui` serves the playground page at /."""
    app = FastAPI(title="attamba-serve", docs_url=None, redoc_url=None)
    app.state.serving = Serving(engine, served_model_name)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"])
    install_error_handlers(app)
    app.add_exception_handler(ClientGone, lambda _, __: Response(status_code=CLIENT_CLOSED))

    v1 = APIRouter(prefix="/v1")

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

    @app.post("/tokenize")
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest, request: Request) -> TokenizeResponse:
        """vLLM's: the token ids of a prompt, or of the prompt the chat template renders from messages."""
        serving = _serving(request)
        serving.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            tokens = serving.encode(serving.chat_prompt(body.messages), "messages")
        else:
            tokens = serving.encode(body.prompt, "prompt") if body.prompt else []
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=engine.max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        serving = _serving(request)
        serving.check_model(body.model)
        text = engine.tokenizer.decode(serving.encode(body.tokens, "tokens")) if body.tokens else ""
        return DetokenizeResponse(prompt=text)

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

    if ui:
        add_playground(app)
    return app
