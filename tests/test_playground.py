"""GET /, the playground page: self-contained, open without the API key (the API behind it is not), talks only
to routes and metrics the server has, and is off with --no-ui. The page in a browser: tests/test_browser.py."""
from __future__ import annotations

import fnmatch
import re
import subprocess
import tomllib
from pathlib import Path

import httpx
import pytest

from engine.async_engine import AsyncEngine
from server.app import create_app
from server.background import serve_in_thread
from server.playground import PAGE
from tests.test_server_cli import ENGINE_FLAGS
from tests.test_server_errors import assert_error

from conftest import serve_process

ROOT = Path(__file__).parent.parent
KEY = "playground-key"


@pytest.fixture(scope="module")
def engine_kw() -> dict:
    return {"max_num_seqs": 4}


@pytest.fixture(scope="module")
def app_kw() -> dict:
    return {"api_key": KEY, "allowed_origins": ["https://ui.example"]}


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_page_is_self_contained(url: str) -> None:
    r = httpx.get(f"{url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert page == PAGE.read_text() and "<script>" in page and "<style>" in page
    assert not re.search(r"""https?://|["'(]//""", page), "the page must not name another host"
    inline = not re.search(r"""\b(src|href)=(?!["']?data:)|@import|url\((?!["']?data:)""", page)
    assert inline, "every resource is inline"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


def test_page_calls_only_routes_and_metrics_the_server_has(url: str, engine: AsyncEngine) -> None:
    page = PAGE.read_text()
    paths = set(re.findall(r"""\bapi\("([^"]+)\"""", page))
    assert paths == {"v1/models", "v1/chat/completions", "tokenize", "metrics"}
    assert all(not p.startswith("/") for p in paths), "relative paths keep the page working under a prefix"
    assert {f"/{p}" for p in paths} <= set(create_app(engine).openapi()["paths"])
    exported = httpx.get(f"{url}/metrics").text
    for name in set(re.findall(r"\bm\.(attamba_\w+)", page)):
        assert re.search(rf"^{name}[{{ ]", exported, re.M), f"the page reads {name}, which /metrics lacks"


def test_page_and_metrics_stay_open_the_api_does_not(url: str) -> None:
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    assert_error(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
    assert_error(httpx.post(f"{url}/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}),
                 401, "invalid_api_key")
    assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200


def test_same_origin_calls_pass_where_cors_is_on(url: str) -> None:
    """The browser sends Origin (the page's own) on its POSTs; CORS for other origins must not refuse them, and
    the page gives no other origin access."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH | {"Origin": url})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    page = httpx.get(f"{url}/", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in page.headers


def test_the_page_ships_in_the_package() -> None:
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert any(fnmatch.fnmatch(PAGE.name, pattern) for pattern in package_data["server"])


def test_no_ui_turns_the_page_off(engine: AsyncEngine, tiny_ckpt: Path) -> None:
    with serve_in_thread(create_app(engine, ui=False)) as base:
        assert_error(httpx.get(f"{base}/"), 404)
    with serve_process("--model", str(tiny_ckpt), *ENGINE_FLAGS, "--no-ui", "--log-level", "warning",
                       stdout=subprocess.DEVNULL) as (_, base):
        assert_error(httpx.get(f"{base}/"), 404)
        assert httpx.get(f"{base}/metrics").status_code == 200
