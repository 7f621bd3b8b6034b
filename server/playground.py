"""GET /: the playground, one self-contained page (playground.html beside this module) that chats over the
streaming API and shows /metrics live. It fetches nothing but its own origin, which its CSP enforces."""
from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from starlette.responses import HTMLResponse

PAGE = files("server").joinpath("playground.html")
# inline script and style of its own; requests only to the origin that served it; no frames, forms or plug-ins
CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def add_playground(app: FastAPI) -> None:
    page = PAGE.read_bytes()

    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
