"""Bad input never reaches the engine and never yields a 500: statuses, error envelopes, and a healthy server after."""
from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import httpx
import pytest

from engine import EngineArgs
from engine.async_engine import AsyncEngine
from server.app import create_app
from server.background import serve_in_thread

from conftest import ENGINE, eventually, idle

KEY = "s3cret-key"
LIMIT = 4096


def new_engine(ckpt: Path, **kw) -> AsyncEngine:
    return AsyncEngine(EngineArgs(model=str(ckpt), **ENGINE, **kw))


@pytest.fixture(scope="module")
def app_kw() -> dict:
    return {"max_body_bytes": LIMIT}


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def assert_healthy(url: str, engine: AsyncEngine, timeout_s: float = 1.0) -> None:
    """/health is 200 and the engine empties within timeout_s (aborts of dropped streams included)."""
    assert httpx.get(f"{url}/health").status_code == 200
    eventually(idle, engine, timeout_s)


OK = {"prompt": "The tower", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD = [
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ("completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("completions", {"prompt": "x", "n": 0}, "n"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "x", "stop": [1]}, "stop"),
    ("completions", {"prompt": "x", "stop": ""}, "stop"),
    ("completions", {"prompt": "x", "stream": "yes"}, "stream"),
    ("completions", {"prompt": "x", "seed": "1"}, "seed"),
    ("completions", {"prompt": "x", "chunk_size": 0}, "chunk_size"),
    ("completions", {"prompt": "x", "chunk_size": 3}, "chunk_size"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": ""}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, 10**9]}, "prompt"),
    ("completions", {"prompt": ["a", ""]}, "prompt"),
    ("completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("completions", {"prompt": [[1, 10**9]]}, "prompt"),
    ("completions", {"prompt": [["a"]]}, "prompt"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "best_of": 2}, "best_of"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"999999": 1}}, "logit_bias"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 200}}, "logit_bias"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ("completions", {"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("completions", {"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ("completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ("completions", {"prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    ("completions", {"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format"),
    ("completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 1}}}},
     "response_format"),
    ("completions", {"prompt": "x", "response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
    ("completions", {"prompt": "x", "guided_regex": "[a-"}, "guided_regex"),
    ("completions", {"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ("completions", {"max_tokens": 2}, "prompt"),
    ("chat/completions", {"messages": "hi"}, "messages"),
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("chat/completions", CHAT | {"logprobs": 1}, "logprobs"),
    ("chat/completions", CHAT | {"top_logprobs": 99, "logprobs": True}, "top_logprobs"),
    ("chat/completions", CHAT | {"max_completion_tokens": -1}, "max_completion_tokens"),
    ("chat/completions", CHAT | {"top_logprobs": 2}, "top_logprobs"),
    ("chat/completions", CHAT | {"stream_options": {"include_usage": True}, "stream": False}, "stream_options"),
    ("chat/completions", CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
    ("chat/completions", CHAT | {"tool_choice": "required"}, "tool_choice"),
    ("chat/completions", CHAT | {"best_of": 3, "n": 2}, "best_of"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}:{sorted(b.items())}"[:60] for p, b, _ in BAD])
def test_invalid_values_and_types_are_400(url: str, engine: AsyncEngine, path: str, body: dict, param: str) -> None:
    before = engine.stats().prompt_tokens
    assert_error(httpx.post(f"{url}/v1/{path}", json=body), 400, param=param)
    assert engine.stats().prompt_tokens == before  # never reached the engine


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"just a string"', b"\xff\xfe"])
def test_malformed_bodies_are_400(url: str, raw: bytes) -> None:
    r = httpx.post(f"{url}/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_context_length_exceeded(url: str, engine: AsyncEngine) -> None:
    body = {"prompt": "The tower", "max_tokens": engine.max_model_len}
    assert_error(httpx.post(f"{url}/v1/completions", json=body), 400, "context_length_exceeded")
    long_chat = {"messages": [{"role": "user", "content": "word " * engine.max_model_len}], "max_tokens": 1}
    assert_error(httpx.post(f"{url}/v1/chat/completions", json=long_chat), 400, "context_length_exceeded")


def test_unknown_model_is_404_but_both_names_work(url: str, engine: AsyncEngine) -> None:
    assert_error(httpx.post(f"{url}/v1/completions", json=OK | {"model": "gpt-9"}), 404, "model_not_found", "model")
    assert_error(httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"model": "nope"}), 404, "model_not_found")
    assert httpx.post(f"{url}/v1/completions", json=OK | {"model": engine.model_name}).status_code == 200


def test_nulls_and_unknown_fields_are_ignored(url: str) -> None:
    extras = {"temperature": None, "stop": None, "seed": None, "frequency_penalty": 0.5, "user": "me"}
    assert httpx.post(f"{url}/v1/completions", json=OK | extras).status_code == 200
    chat = CHAT | extras | {"max_completion_tokens": None}
    assert httpx.post(f"{url}/v1/chat/completions", json=chat).status_code == 200
    assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": None}), 400, param="prompt")


def test_unknown_routes_and_methods_use_the_envelope(url: str) -> None:
    assert_error(httpx.get(f"{url}/v1/nothing"), 404)
    assert_error(httpx.get(f"{url}/v1/completions"), 405)


def test_oversized_bodies_are_413(url: str, engine: AsyncEngine) -> None:
    big = OK | {"prompt": "x" * LIMIT}
    assert_error(httpx.post(f"{url}/v1/completions", json=big), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced on the bytes actually received
        yield b'{"prompt": "'
        for _ in range(8):
            yield b"y" * 1024
        yield b'"}'

    assert_error(httpx.post(f"{url}/v1/completions", content=chunked()), 413)
    assert_healthy(url, engine)


def test_api_key(engine: AsyncEngine) -> None:
    with serve_in_thread(create_app(engine, api_key=KEY)) as base:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            assert_error(httpx.post(f"{base}/v1/completions", json=OK, headers=headers), 401, "invalid_api_key")
            assert_error(httpx.get(f"{base}/v1/models", headers=headers), 401, "invalid_api_key")
        good = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{base}/v1/completions", json=OK, headers=good).status_code == 200
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_ckpt: Path) -> None:
    eng = new_engine(tiny_ckpt, max_num_seqs=1, max_waiting=1)
    eng.start()
    body = {"prompt": "The tower", "max_tokens": 100, "ignore_eos": True, "stream": True}

    async def burst(base: str, k: int = 4) -> list[httpx.Response]:
        answered, everyone = [], asyncio.Event()  # hold every admitted stream open until all k have answered

        async def attempt(http: httpx.AsyncClient) -> httpx.Response:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                answered.append(r)
                if len(answered) == k:
                    everyone.set()
                await everyone.wait()
                return r  # leaving the block drops the stream, which aborts its request

        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            return await asyncio.gather(*(attempt(http) for _ in range(k)))

    try:
        with serve_in_thread(create_app(eng)) as base:
            responses = asyncio.run(burst(base))
            rejected = [r for r in responses if r.status_code == 429]
            assert rejected and all(r.status_code in (200, 429) for r in responses)
            for r in rejected:
                assert r.headers["retry-after"].isdigit()
                assert_error(r, 429, "rate_limit_exceeded")
            assert_healthy(base, eng)
    finally:
        eng.shutdown()


def test_not_started_and_draining_are_503(tiny_ckpt: Path, engine: AsyncEngine) -> None:
    with serve_in_thread(create_app(new_engine(tiny_ckpt))) as base:  # engine loop never started
        assert httpx.get(f"{base}/health").status_code == 503
        assert_error(httpx.post(f"{base}/v1/completions", json=OK), 503)
    app = create_app(engine)
    with serve_in_thread(app) as base:
        app.state.serving.lifecycle.draining = True
        assert httpx.get(f"{base}/health").status_code == 503
        assert_error(httpx.post(f"{base}/v1/chat/completions", json=CHAT), 503)
        app.state.serving.lifecycle.draining = False
        assert_healthy(base, engine)


def test_server_is_healthy_after_bad_input(url: str, engine: AsyncEngine) -> None:
    assert_healthy(url, engine)
    assert httpx.post(f"{url}/v1/completions", json=OK).status_code == 200


# ---- engine errors reach HTTP by type, never by their text ----------------------------------------------------
SINKS = {"APIError", "_invalid", "error_response", "print"}  # where an error's message may go, as is


def is_sink(call: ast.AST) -> bool:
    """A call that passes a message on: an envelope, a printed line, or another exception."""
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
            and (call.func.id in SINKS or re.search(r"(Error|Exception)$", call.func.id) is not None))


def message_reads(source: str) -> list[int]:
    """Lines where code reads an exception's text (str(exc), f"{exc}", exc.args) for anything but passing it
    on, unchanged, into a message (see is_sink)."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    excs = {h.name for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and h.name}
    excs |= {a.arg for a in ast.walk(tree) if isinstance(a, ast.arg) and a.annotation is not None
             and re.search(r"Error|Exception|QueueFull|EngineDead|Rejected|Exceeded", ast.unparse(a.annotation))}

    def passed_on(node: ast.AST) -> bool:
        parent = parents[node]
        if isinstance(parent, ast.JoinedStr):  # f"...{exc}..."
            parent = parents[parent]
        if isinstance(parent, ast.keyword):
            parent = parents[parent]
        return is_sink(parent)

    def is_exc(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id in excs

    lines = []
    for node in ast.walk(tree):
        text = (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("str", "repr", "format") and len(node.args) == 1 and is_exc(node.args[0]))
        text |= isinstance(node, ast.FormattedValue) and is_exc(node.value)
        if (text and not passed_on(node)) or (isinstance(node, ast.Attribute) and node.attr == "args"
                                             and is_exc(node.value)):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_server_code_reads_exception_text() -> None:
    parsing = ('def param_of(exc: ValueError) -> str:\n    return str(exc).split()[0]\n'
               'try:\n    pass\nexcept ValueError as e:\n    field = e.args[0]\n    ok = APIError(400, f"bad: {e}")\n')
    assert message_reads(parsing) == [2, 6]
    server = Path(__file__).resolve().parents[1] / "server"
    found = {path.name: lines for path in sorted(server.rglob("*.py")) if (lines := message_reads(path.read_text()))}
    assert not found, f"map engine errors by type (server/errors.py), never by their message: {found}"
