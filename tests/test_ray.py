"""`attamba serve --replicas 2` on a local Ray cluster: routing, metrics, a killed replica, drain on SIGTERM.

One server process (a Ray cluster plus two engine replicas of the shipped checkpoint, small caches) for the
module; it takes about 35 s to start and the module a minute and a half, so these are `slow` (`make test-ray`). Unit checks of the pieces
run without a cluster; everything skips when Ray Serve is not installed.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("ray.serve")

from server.ray_app import MergedCollector, PrefixAffinityRouter, affinity_key, labelled_families  # noqa: E402

from conftest import serve_engine, serve_process, sse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "attamba-wt2"
ENGINE_FLAGS = ["--cache-memory", "64MiB", "--max-num-seqs", "16"]
PROMPTS = ["The history of the", "In 1914 the", "The tower was built", "Valkyria Chronicles is a"]
START_TIMEOUT_S = 180


def stream(url: str, prompt: str, max_tokens: int) -> tuple[str, list[dict | str]]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return r.headers["x-attamba-replica"], sse(r)


def replicas_in_metrics(url: str) -> set[str]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return {s.labels["replica"] for f in families if f.name == "attamba_num_requests_running" for s in f.samples}


# ---- without a cluster ---------------------------------------------------------------------------------------------
def test_affinity_key_is_the_prompt_prefix() -> None:
    long = "x" * 500
    assert affinity_key(json.dumps({"prompt": long}).encode()) == long[:128]
    assert affinity_key(json.dumps({"prompt": long + "a"}).encode()) == affinity_key(json.dumps({"prompt": long + "b"}).encode())
    assert affinity_key(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()).startswith("[{")
    assert affinity_key(b"not json") is None and affinity_key(b"[1]") is None and affinity_key(b"{}") is None


def test_replica_families_merge_into_one_exposition() -> None:
    reports = []
    for replica in ("a", "b"):
        registry = CollectorRegistry()
        Counter("attamba_x", "doc", ["model_name"], registry=registry).labels("m").inc()
        reports.append(labelled_families(registry, replica))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(reports))
    text = generate_latest(registry).decode()
    assert text.count("# TYPE attamba_x_total counter") == 1
    family = next(f for f in text_string_to_metric_families(text) if f.name == "attamba_x")
    assert {s.labels["replica"] for s in family.samples if s.name == "attamba_x_total"} == {"a", "b"}


def _router(queue_lens: dict[str, int]) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)
    router._replica_queue_len_cache = SimpleNamespace(get=lambda rid: queue_lens.get(rid.unique_id))
    router.initialize_state(imbalance=4)
    return router


class _ReplicaID(NamedTuple):
    unique_id: str


def _replicas(*ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(replica_id=_ReplicaID(i)) for i in ids]


def test_prefix_router_is_sticky_until_imbalanced() -> None:
    def choose(router: PrefixAffinityRouter, replicas: list, pending: SimpleNamespace) -> list[list]:
        return asyncio.run(router.choose_replicas(replicas, pending))

    reps = _replicas("r1", "r2", "r3")
    pending = SimpleNamespace(kwargs={"affinity_key": "The history of"})
    router = _router({})
    first = choose(router, reps, pending)[0]
    assert len(first) == 1
    assert all(choose(router, list(reversed(reps)), pending)[0] == first for _ in range(5))
    chosen = first[0].replica_id.unique_id
    ranks = choose(_router({"r1": 0, "r2": 0, "r3": 0} | {chosen: 10}), reps, pending)
    assert len(ranks) == 1 and ranks[0][-1] is first[0]  # overloaded: least loaded first
    other = choose(router, reps, SimpleNamespace(kwargs={}))
    assert len(other) == 1 and len(other[0]) == 2  # no prompt: power of two choices


# ---- a real two-replica server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as out, serve_process(
            "--model", str(MODEL), *ENGINE_FLAGS, "--replicas", "2", "--grace-period", "30",
            timeout_s=START_TIMEOUT_S, ready=lambda url: len(replicas_in_metrics(url)) == 2, log=log,
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT) as (proc, url):
        yield url, proc, log


@pytest.fixture(scope="module")
def url(server: tuple[str, subprocess.Popen, Path]) -> str:
    return server[0]


@pytest.mark.slow
def test_16_concurrent_streams_complete_on_both_replicas(url: str) -> None:
    def staggered(i: int) -> tuple[str, list[dict | str]]:
        time.sleep(0.05 * i)  # arrivals 50 ms apart (all 16 still overlap), not one burst the router
        return stream(url, PROMPTS[i % 4], 48)  # sends before it has probed the second replica

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(staggered, range(16)))
    for _, events in results:
        assert events[-1] == "[DONE]" and all("error" not in e for e in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert len({replica for replica, _ in results}) == 2


@pytest.mark.slow
def test_greedy_outputs_equal_the_single_process_server(url: str) -> None:
    with serve_engine(MODEL, cache_memory=64 << 20, max_num_seqs=16) as single:
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_tokens": 16, "temperature": 0.0}
            want = httpx.post(f"{single}/v1/completions", json=body, timeout=60).json()
            got = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
            assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
            chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0.0}
            assert (httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json()["choices"]
                    == httpx.post(f"{single}/v1/chat/completions", json=chat, timeout=60).json()["choices"])


@pytest.mark.slow
def test_errors_are_the_single_process_envelopes(url: str) -> None:
    bad = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    unknown = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "model": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    huge = httpx.post(f"{url}/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "error" in huge.json()
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "attamba-wt2"


@pytest.mark.slow
def test_metrics_of_every_replica_in_one_scrape(url: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: stream(url, PROMPTS[i % 4], 4), range(8)))
    time.sleep(1.5)  # replicas report every 0.5 s
    text = httpx.get(f"{url}/metrics").text
    assert text.count("# TYPE attamba_request_success_total") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    serve_engine = {s.labels["replica"]: s.value for s in families["attamba_request_success"].samples
              if s.name == "attamba_request_success_total"}
    assert len(serve_engine) == 2 and sum(serve_engine.values()) >= 8
    ttft = [s for s in families["attamba_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert {s.labels["replica"] for s in ttft} == set(serve_engine)


KILL_REPLICA = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "#AttambaEngine#" in a["name"] and a["name"].endswith(sys.argv[2]))
ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
"""


def kill_replica(log: Path, replica: str) -> None:
    """Kill an engine replica's actor, as a Ray driver of the server's cluster (its token: ~/.ray/auth_token)."""
    address = re.search(r"ray cluster at (\S+)", log.read_text()).group(1)
    subprocess.run([sys.executable, "-c", KILL_REPLICA, address, replica], check=True, timeout=60,
                   env=os.environ | {"RAY_AUTH_MODE": "token"})


@pytest.mark.slow
def test_a_client_that_leaves_aborts_its_request_on_the_replica(url: str) -> None:
    def aborted() -> float:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        return sum(s.value for f in families if f.name == "attamba_request_success" for s in f.samples
                   if s.name.endswith("_total") and s.labels["finish_reason"] == "abort")

    before = aborted()
    body = {"prompt": PROMPTS[2], "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    deadline = time.monotonic() + 10
    while aborted() < before + 1:
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_killed_replica_fails_its_streams_cleanly_and_comes_back(server: tuple[str, subprocess.Popen, Path]) -> None:
    url, _, log = server
    body = {"prompt": PROMPTS[0], "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        victim = r.headers["x-attamba-replica"]
        lines = r.iter_lines()
        for _ in range(10):  # the stream is under way
            assert next(line for line in lines if line.startswith("data: ")) != "data: [DONE]"
        kill_replica(log, victim)
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "service_unavailable" and "replica" in error["message"]
    for prompt in PROMPTS:  # new requests go to the survivor (or the replacement)
        replica, events = stream(url, prompt, 4)
        assert replica != victim and events[-1] == "[DONE]"
    deadline = time.monotonic() + 90
    while not (len(current := replicas_in_metrics(url)) == 2 and victim not in current):
        assert time.monotonic() < deadline, f"Ray Serve did not replace the replica: {current}"
        time.sleep(1)


@pytest.mark.slow
def test_sigterm_drains_every_replica_then_exits_0(server: tuple[str, subprocess.Popen, Path]) -> None:
    url, proc, log = server
    body = {"prompt": PROMPTS[1], "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health stayed 200 after SIGTERM"
            time.sleep(0.2)
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
