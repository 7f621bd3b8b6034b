"""Request fields that change the output (none accepted and ignored), batches, /tokenize, and the fixes
of issue 11, over HTTP against a tiny random checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import EngineArgs
from engine.async_engine import AsyncEngine
from server.app import create_app
from server.background import serve_in_thread
from tests.test_guided import SCHEMA
from tests.test_server_errors import assert_error

from conftest import sse

GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine_kw() -> dict:
    return {"max_num_seqs": 16, "max_waiting": 8}


@pytest.fixture(scope="module")
def app_kw() -> dict:
    return {"allowed_origins": ["https://ui.example"]}


def complete(url: str, **body) -> dict:
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(url: str, text: str) -> list[int]:
    return httpx.post(f"{url}/tokenize", json={"prompt": text}).json()["tokens"]


# ---- 1: lone surrogates ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,raw,param", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
])
def test_lone_surrogates_are_400(url: str, path: str, raw: bytes, param: str) -> None:
    r = httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"})
    assert "lone surrogate" in assert_error(r, 400, param=param)["message"]
    assert httpx.get(f"{url}/health").status_code == 200


# ---- 3: prompts in all four forms -----------------------------------------------------------------------------
def test_batch_prompts_in_all_forms(url: str) -> None:
    texts = ["The tower", "In 1914"]
    ids = [tokenize(url, t) for t in texts]
    one_by_one = [complete(url, prompt=t, max_tokens=4, **GREEDY)["choices"][0]["text"] for t in texts]
    for prompt in (texts, ids):
        out = complete(url, prompt=prompt, max_tokens=4, n=2, **GREEDY)
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]  # choice i*n+j: completion j of prompt i
        assert [c["text"] for c in out["choices"]] == [one_by_one[0]] * 2 + [one_by_one[1]] * 2
        assert out["usage"] == {"prompt_tokens": 2 * sum(map(len, ids)) // 2, "completion_tokens": 16,
                                "total_tokens": sum(map(len, ids)) + 16}
    assert complete(url, prompt=ids[0], max_tokens=4, **GREEDY)["choices"][0]["text"] == one_by_one[0]
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": texts, "max_tokens": 4, "stream": True,
                                                             "stream_options": {"include_usage": True}, **GREEDY}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 8
    streamed = {i: "".join(e["choices"][0]["text"] for e in events[:-2] if e["choices"][0]["index"] == i)
                for i in range(2)}
    assert streamed == dict(enumerate(one_by_one))


# ---- 4: n beyond the waiting queue ----------------------------------------------------------------------------
def test_n_that_could_never_be_admitted_is_400_not_429(url: str) -> None:
    assert_error(httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 9, "max_tokens": 1}), 400, param="n")
    batch = {"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}
    assert_error(httpx.post(f"{url}/v1/completions", json=batch), 400, param="n")
    assert complete(url, prompt="x", n=8, max_tokens=1)["usage"]["completion_tokens"] == 8


# ---- 2: fields that change the output -------------------------------------------------------------------------
def test_logit_bias_forces_a_token(url: str) -> None:
    the = tokenize(url, " the")
    assert len(the) == 1
    out = complete(url, prompt="The tower", max_tokens=5, temperature=1.0, seed=3, ignore_eos=True,
                   logit_bias={str(the[0]): 100})
    assert out["choices"][0]["text"] == " the" * 5
    chat = httpx.post(f"{url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logit_bias": {str(the[0]): 100},
        **GREEDY}).json()
    assert chat["choices"][0]["message"]["content"] == " the" * 3


def _distinct_tokens(url: str, **extra) -> int:
    out = complete(url, prompt="The album was released", max_tokens=40, logprobs=0, **GREEDY, **extra)
    return len(set(out["choices"][0]["logprobs"]["tokens"]))


def test_penalties_reduce_repetition(url: str) -> None:
    plain = _distinct_tokens(url)  # a random model, greedy, loops over a few tokens
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 3.0}):
        assert _distinct_tokens(url, **penalty) > plain + 5, penalty


def test_echo_returns_the_prompt_with_its_logprobs(url: str) -> None:
    prompt = tokenize(url, "The tower")
    first = complete(url, prompt=prompt, max_tokens=1, logprobs=2, **GREEDY)["choices"][0]
    echoed = complete(url, prompt="The tower", max_tokens=2, logprobs=2, echo=True, **GREEDY)["choices"][0]
    assert echoed["text"].startswith("The tower" + first["text"])
    lp = echoed["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + 2 and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == echoed["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    # the prompt's scores are the model's: scoring prompt + first token gives the first token's logprob
    rescored = complete(url, prompt=prompt + tokenize(url, first["text"]), max_tokens=1, logprobs=2, echo=True,
                        **GREEDY)["choices"][0]["logprobs"]
    assert rescored["token_logprobs"][len(prompt)] == pytest.approx(first["logprobs"]["token_logprobs"][0], abs=1e-4)
    with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "The tower", "max_tokens": 2, "echo": True,
                                                             "stream": True, **GREEDY}) as r:
        events = sse(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == echoed["text"]


def test_stop_token_ids_and_include_stop_str_in_output(url: str) -> None:
    full = complete(url, prompt="x", max_tokens=8, logprobs=0, **GREEDY)["choices"][0]
    tokens = full["logprobs"]["tokens"]
    k = next(i for i in range(2, 8) if tokens[i].strip() and tokens[i] not in tokens[:i])
    assert "\ufffd" not in "".join(tokens[: k + 1])
    stop_id = tokenize(url, tokens[k])
    assert len(stop_id) == 1
    cut = complete(url, prompt="x", max_tokens=8, stop_token_ids=stop_id, **GREEDY)["choices"][0]
    assert (cut["text"], cut["finish_reason"]) == ("".join(tokens[:k]), "stop")
    kept = complete(url, prompt="x", max_tokens=8, stop_token_ids=stop_id, include_stop_str_in_output=True,
                    **GREEDY)["choices"][0]
    assert kept["text"] == "".join(tokens[: k + 1])
    stop = tokens[k].strip()
    kept = complete(url, prompt="x", max_tokens=8, stop=[stop], include_stop_str_in_output=True,
                    **GREEDY)["choices"][0]
    assert kept["text"] == full["text"][: full["text"].index(stop) + len(stop)]


def test_min_tokens_holds_off_eos(url: str, engine: AsyncEngine) -> None:
    eos = {str(engine.tokenizer.eos_token_id): 100}
    assert complete(url, prompt="x", max_tokens=8, logit_bias=eos)["usage"]["completion_tokens"] == 1
    out = complete(url, prompt="x", max_tokens=8, logit_bias=eos, min_tokens=3)
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "stop"


def test_structured_output_over_http(url: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    out = complete(url, prompt="The tower", max_tokens=200, n=3, seed=2, response_format=fmt)
    for choice in out["choices"]:
        jsonschema.validate(json.loads(choice["text"]), SCHEMA)
    chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Who?"}],
                                                          "max_tokens": 200, "response_format": fmt}).json()
    jsonschema.validate(json.loads(chat["choices"][0]["message"]["content"]), SCHEMA)
    picked = complete(url, prompt="x", max_tokens=20, n=4, seed=1, guided_choice=["red", "green"])
    assert {c["text"] for c in picked["choices"]} <= {"red", "green"}


def test_tool_choice_none_is_accepted(url: str) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "tools": tools, "tool_choice": "none"}
    assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
    r = httpx.post(f"{url}/v1/chat/completions", json=body | {"tool_choice": "auto"})
    assert "tool parser" in assert_error(r, 400, param="tool_choice")["message"]


# ---- /tokenize, /detokenize ----------------------------------------------------------------------------------
def test_tokenize_and_detokenize(url: str, engine: AsyncEngine) -> None:
    r = httpx.post(f"{url}/tokenize", json={"prompt": "The tower"}).json()
    assert r["count"] == len(r["tokens"]) > 0 and r["max_model_len"] == engine.max_model_len
    assert httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "The tower"}
    chat = httpx.post(f"{url}/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert engine.tokenizer.decode(chat["tokens"]) == "<|user|>\nHi\n<|assistant|>\n"
    assert_error(httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}), 400, param="tokens")
    assert_error(httpx.post(f"{url}/tokenize", json={"text": "x"}), 400)


# ---- 8: smaller -----------------------------------------------------------------------------------------------
def test_api_key_is_checked_before_the_body(engine: AsyncEngine) -> None:
    with serve_in_thread(create_app(engine, api_key="k")) as base:
        for path in ("/v1/completions", "/tokenize"):
            r = httpx.post(f"{base}{path}", content=b"{not json", headers={"content-type": "application/json"})
            assert_error(r, 401, "invalid_api_key")
        ok = httpx.post(f"{base}/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200


def test_metrics_count_completions_alike_and_have_no_created_series(url: str) -> None:
    def scrape() -> dict[str, float]:
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
            for s in family.samples:
                totals[s.name] = totals.get(s.name, 0.0) + s.value
        return totals

    before = scrape()
    complete(url, prompt="x", n=3, max_tokens=2)
    after = scrape()
    assert not [name for name in after if name.endswith("_created")]
    for name in ("attamba_request_success_total", "attamba_e2e_request_latency_seconds_count",
                 "attamba_time_to_first_token_seconds_count"):
        assert after[name] - before.get(name, 0) == 3, name


def test_stream_cut_inside_a_character_sends_no_replacement_char(url: str, engine: AsyncEngine) -> None:
    first_byte = engine.tokenizer.encode("中")[0]
    assert engine.tokenizer.decode([first_byte]) == "\ufffd"
    body = {"prompt": "x", "max_tokens": 1, "logit_bias": {str(first_byte): 100}}
    assert complete(url, **body)["choices"][0]["text"] == ""
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
        assert all("\ufffd" not in e["choices"][0]["text"] for e in sse(r)[:-1])


def test_cors_preflight(url: str) -> None:
    r = httpx.options(f"{url}/v1/completions", headers={"Origin": "https://ui.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"


def test_models_advertise_what_the_cache_holds(tiny_ckpt: Path) -> None:
    eng = AsyncEngine(EngineArgs(model=str(tiny_ckpt), cache_memory=200_000, dtype="float32", block_size=1))
    with serve_in_thread(create_app(eng)) as base:
        card = httpx.get(f"{base}/v1/models").json()["data"][0]
    assert card["max_model_len"] == eng.max_model_len < 8 * eng.model_config.max_seq_len
    assert eng.engine.cache.fits_alone(card["max_model_len"])
