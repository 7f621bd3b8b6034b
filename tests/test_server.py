"""The HTTP server end to end: a real uvicorn on a loopback port, real clients, a tiny random checkpoint."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.async_engine import AsyncEngine
from server.chat import ChatTemplate

from conftest import eventually, idle, sse

SAMPLE = (Path(__file__).parent / "data" / "wikitext_sample.txt").read_text()
PROMPTS = [line.strip()[:80] for line in SAMPLE.splitlines() if len(line.strip()) > 40][:16]
NAME = "tiny"


@pytest.fixture(scope="module")
def engine_kw() -> dict:
    return {"max_num_seqs": 16}


@pytest.fixture(scope="module")
def app_kw() -> dict:
    return {"served_model_name": NAME}


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_completion_stream_equals_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0.0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert full.object == "text_completion" and full.model == NAME
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert 1 <= full.usage.completion_tokens <= 12


def test_openai_chat_stream_equals_non_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    kw = dict(model=NAME, messages=messages, max_completion_tokens=12, temperature=0.0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert full.usage.completion_tokens >= 1


def test_n_choices_and_logprobs(url: str) -> None:
    body = {"prompt": PROMPTS[2], "max_tokens": 5, "n": 3, "seed": 7, "logprobs": 2, "ignore_eos": True}
    full = httpx.post(f"{url}/v1/completions", json=body).json()
    assert [c["index"] for c in full["choices"]] == [0, 1, 2]
    assert full["usage"]["completion_tokens"] == 15
    for choice in full["choices"]:
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
        assert all(len(top) <= 2 for top in lp["top_logprobs"]) and all(x <= 0 for x in lp["token_logprobs"])
        assert choice["finish_reason"] == "length"
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]"
    streamed = {i: "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i)
                for i in range(3)}
    assert streamed == {c["index"]: c["text"] for c in full["choices"]}  # same seeds, same samples


def test_chat_logprobs_and_models(url: str, engine: AsyncEngine) -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], "max_tokens": 4,
            "logprobs": True, "top_logprobs": 3, "model": engine.model_name}
    choice = httpx.post(f"{url}/v1/chat/completions", json=body).json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert entries and all(len(e["top_logprobs"]) == 3 and isinstance(e["bytes"], list) for e in entries)
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == NAME and models["data"][0]["max_model_len"] == engine.max_model_len


def test_concurrent_streams_equal_sequential(url: str, engine: AsyncEngine) -> None:
    body = {"model": NAME, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    one_by_one = [httpx.post(f"{url}/v1/completions", json=body | {"prompt": p}).json()["choices"][0]["text"]
                  for p in PROMPTS]

    async def stream(http: httpx.AsyncClient, prompt: str) -> str:
        text = ""
        async with http.stream("POST", "/v1/completions", json=body | {"prompt": prompt, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(*(stream(http, p) for p in PROMPTS))

    assert asyncio.run(all_at_once()) == one_by_one
    eventually(idle, engine)


def test_metrics_after_traffic(url: str, client: openai.OpenAI) -> None:
    client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=4, extra_body={"ignore_eos": True})
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model_name") == NAME:
                samples.setdefault(s.name, []).append(s)

    def value(name: str, **labels: str) -> float:
        return sum(s.value for s in samples[name] if labels.items() <= s.labels.items())

    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert value(f"attamba_{hist}_count") >= 1 and value(f"attamba_{hist}_sum") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "cache_bytes_used"):
        assert value(f"attamba_{gauge}") >= 0
    assert 0 <= value("attamba_cache_usage_perc") <= 1
    assert value("attamba_cache_bytes_full_kv_equivalent") >= 0
    assert value("attamba_prompt_tokens_total") > 0 and value("attamba_generation_tokens_total") >= 4
    assert value("attamba_request_success_total", finish_reason="length") >= 1
    assert value("attamba_num_preemptions_total") >= 0


def test_stream_disconnect_aborts_and_frees_cache(url: str, engine: AsyncEngine) -> None:
    before = eventually(idle, engine)
    max_tokens = engine.max_model_len - 16
    body = {"prompt": "The tower", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert next(line for line in r.iter_lines() if line.startswith("data: {"))
        eventually(lambda s: s.num_running == 1 and s.cache_bytes_used > before.cache_bytes_used, engine)
    after = eventually(idle, engine, timeout_s=1.0)  # leaving the block closed the connection
    assert after.cache_bytes_used == before.cache_bytes_used
    assert after.generation_tokens - before.generation_tokens < max_tokens  # it really was cut short


def test_non_streaming_disconnect_aborts(url: str, engine: AsyncEngine) -> None:
    before = eventually(idle, engine)
    body = {"prompt": "The tower", "max_tokens": engine.max_model_len - 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
    after = eventually(idle, engine, timeout_s=1.0)
    assert after.cache_bytes_used == before.cache_bytes_used
    assert after.generation_tokens - before.generation_tokens < body["max_tokens"]


def test_chat_template_rendering_and_stops(engine: AsyncEngine) -> None:
    default = ChatTemplate("", engine.tokenizer)
    assert default.render([("system", "Be brief."), ("user", "Hi {there}")]) == \
        "<|system|>\nBe brief.\n<|user|>\nHi {there}\n<|assistant|>\n"
    assert "<|user|>" in default.stop
    assert engine.tokenizer.token_to_id("<|user|>") in default.stop_token_ids  # a special token never shows as text
    custom = ChatTemplate("### {role}:\n{content}\n\n", engine.tokenizer)
    assert custom.render([("user", "Hi")]) == "### user:\nHi\n\n### assistant:\n"
    assert "### user:" in custom.stop
    with pytest.raises(ValueError, match="role"):
        ChatTemplate("{content} {speaker}", engine.tokenizer)
