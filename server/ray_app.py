"""`attamba serve --replicas N`: the app of server/app.py as N Ray Serve replicas behind one endpoint.

One Ray Serve application of three deployments:
- `AttambaEngine` (N replicas, or autoscaled): its own AsyncEngine and cache budget, and the very app
  `attamba serve` runs; `handle_http` runs one HTTP request through that app in-process and streams the
  response back, so routes, errors, streaming and the API key are those of the single process.
- `AttambaIngress` (the HTTP front, no CPU reserved): forwards each request to an engine replica and relays
  the response. A replica that fails before answering is retried once on another; one that dies
  mid-stream ends an SSE response with an error event and `data: [DONE]`.
- `MetricsHub`: every engine replica reports its Prometheus families (each series labelled `replica`) and
  its requests in flight every REPORT_S; GET /metrics renders all of them; the drain phase of SIGTERM
  reaches the replicas through it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.schema import LoggingConfig
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message

from engine.async_engine import AsyncEngine
from engine.config import EngineArgs
from engine.settings import from_args
from models.registry import resolve_model
from server.app import create_app
from server.errors import APIError, error_event, error_response
from server.scale_out import ScaleOut, flags_from
from server.serve import ServerSettings, configure
from server.serving import Serving
from server.sse import DONE

APP_NAME = "attamba"
REPORT_S = 0.5  # how often a replica reports its metrics and learns the drain phase
STALE_S = 5.0  # a replica silent this long (dead) drops out of /metrics
ABORT_WAIT_S = 2.0  # after aborting what is left: how long its streams get to end
DISCONNECT_WAIT_S = 2.0  # after a client leaves: how long the app gets to abort its request
INGRESS_MAX_ONGOING = 4096  # the ingress only relays; the engine replicas bound the work
AFFINITY_CHARS = 128  # prompt prefix (characters) that decides the replica under --router prefix
OBJECT_STORE_BYTES = 128 << 20  # a local cluster's object store: only small messages pass through it
PHASES = ("serving", "draining", "abort")

log = logging.getLogger("attamba.ray")


# ---- running one HTTP request through an in-process ASGI app --------------------------------------------------
async def run_asgi(app: ASGIApp, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
    """The response messages of `app` for one request; closing the iterator early is a client disconnect."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        messages.put_nowait(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    try:
        while (message := await messages.get()) is not None:
            yield message
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                break
        else:
            task.result()  # the app failed without answering: raise its error
    finally:
        gone.set()
        if not task.done():
            try:
                await asyncio.wait_for(task, DISCONNECT_WAIT_S)
            except Exception:  # noqa: BLE001 - the response is over either way (a timeout cancels the app)
                pass


def http_scope(method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
            "root_path": "", "headers": headers, "client": None, "server": None, "state": {}}


# ---- metrics -------------------------------------------------------------------------------------------------------
def labelled_families(registry: CollectorRegistry, replica: str) -> list[Metric]:
    """Every family of `registry`, each sample with the extra label replica=`replica`."""
    out = []
    for family in registry.collect():
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        for s in family.samples:
            copy.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)
        out.append(copy)
    return out


class MergedCollector(Collector):
    """The families of several replicas merged by name (one HELP/TYPE each, all their samples)."""

    def __init__(self, reports: list[list[Metric]]) -> None:
        self.reports = reports

    def collect(self) -> list[Metric]:
        merged: dict[str, Metric] = {}
        for families in self.reports:
            for family in families:
                into = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
                into.samples.extend(family.samples)
        return list(merged.values())


@serve.deployment(name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=INGRESS_MAX_ONGOING)
class MetricsHub:
    """The replicas' latest metrics and requests in flight, and the application's phase."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, list[Metric], int]] = {}
        self.phase = "serving"

    def report(self, replica: str, families: list[Metric], in_flight: int) -> str:
        """Store a replica's report; answer the phase it should be in."""
        self.reports[replica] = (time.monotonic(), families, in_flight)
        return self.phase

    def set_phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.phase = phase

    def _fresh(self) -> list[tuple[float, list[Metric], int]]:
        now = time.monotonic()
        self.reports = {r: rep for r, rep in self.reports.items() if now - rep[0] < STALE_S}
        return list(self.reports.values())

    def in_flight(self) -> int:
        """Requests in flight on all live replicas (as of their last reports)."""
        return sum(n for _, _, n in self._fresh())

    def render(self) -> bytes:
        """The Prometheus text of every live replica."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(MergedCollector([families for _, families, _ in self._fresh()]))
        return generate_latest(registry)


# ---- the engine replicas ---------------------------------------------------------------------------------------------
@serve.deployment(name="AttambaEngine")
class AttambaEngine:
    """One engine (own cache budget) and the app of server/app.py around it."""

    async def __init__(self, engine_args: EngineArgs, app_kwargs: dict[str, Any], hub: DeploymentHandle) -> None:
        self.engine = AsyncEngine(engine_args)
        self.app = create_app(self.engine, **app_kwargs)
        self.serving: Serving = self.app.state.serving
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.hub = hub
        self.engine.start()
        self.reporter = asyncio.create_task(self._report_loop())

    async def handle_http(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                          body: bytes, affinity_key: str | None = None
                          ) -> AsyncIterator[tuple[int, list[tuple[bytes, bytes]]] | bytes]:
        """One HTTP request through the app: (status, headers) first, then the body's chunks.
        `affinity_key` is read by the request router only."""
        async for message in run_asgi(self.app, http_scope(method, path, query, headers), body):
            if message["type"] == "http.response.start":
                yield message["status"], [*message.get("headers", []), (b"x-attamba-replica", self.replica.encode())]
            elif message.get("body"):
                yield message["body"]

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine loop has stopped."""
        if not self.engine.is_alive:
            raise RuntimeError("the engine loop is not running")

    async def _report_loop(self) -> None:
        lifecycle = self.serving.lifecycle
        while True:
            try:
                families = labelled_families(self.serving.metrics.registry, self.replica)
                phase = await self.hub.report.remote(self.replica, families, lifecycle.active)
                if phase != "serving":
                    lifecycle.draining = True
                if phase == "abort" and lifecycle.active:
                    lifecycle.abort_all()
            except RayError as exc:  # the hub is being restarted; the next report retries
                log.warning("metrics report failed: %s", exc)
            await asyncio.sleep(REPORT_S)

    def __del__(self) -> None:
        self.reporter.cancel()
        self.engine.shutdown()


# ---- routing -------------------------------------------------------------------------------------------------------
def affinity_key(body: bytes) -> str | None:
    """The first AFFINITY_CHARS characters of a request's prompt (or messages), None without one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    prompt = data.get("prompt", data.get("messages"))
    if prompt is None:
        return None
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    return text[:AFFINITY_CHARS]


def _score(key: str, replica: RunningReplica) -> bytes:
    return hashlib.blake2b(f"{key}\0{replica.replica_id.unique_id}".encode(), digest_size=8).digest()


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    """Requests whose prompts start alike go to the same replica (rendezvous hashing of the prompt prefix over
    the replicas, so a replica joining or leaving moves only its share), unless that replica has `imbalance`
    more requests than the least loaded one; requests without a prompt get power of two choices."""

    def initialize_state(self, imbalance: int = 8) -> None:
        self.imbalance = imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = pending_request.kwargs.get("affinity_key") if pending_request is not None else None
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: _score(key, r), reverse=True)
        lengths = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in ranked}
        known = [n for n in lengths.values() if n is not None]
        first = lengths[ranked[0].replica_id]
        if first is not None and known and first - min(known) > self.imbalance:
            return [sorted(ranked, key=lambda r: lengths[r.replica_id] if lengths[r.replica_id] is not None
                           else first)]
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]


# ---- the HTTP front ------------------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body; 413 past `limit` bytes (the replica's own limit, checked here before shipping it)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body larger than {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _relay(stream: DeploymentResponseGenerator, sse: bool) -> AsyncIterator[bytes]:
    """The rest of a replica's response; an SSE stream whose replica fails ends with an error event and [DONE]."""
    try:
        async for chunk in stream:
            yield chunk
    except RayError as exc:
        if not sse:
            raise
        log.warning("replica failed mid-stream: %s", exc)
        yield error_event(APIError(503, f"the replica serving this request failed ({type(exc).__name__}); "
                                        "retry the request", "service_unavailable"))
        yield DONE
    finally:
        stream.cancel()


@serve.deployment(name="AttambaIngress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING)
class AttambaIngress:
    """Relays HTTP requests to the engine replicas; serves /metrics from the hub."""

    def __init__(self, engine: DeploymentHandle, hub: DeploymentHandle, max_body_bytes: int,
                 prefix_affinity: bool) -> None:
        self.engine = engine.options(stream=True)
        self.hub = hub
        self.max_body_bytes = max_body_bytes
        self.prefix_affinity = prefix_affinity

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET" and request.url.path == "/metrics":
            return Response(await self.hub.render.remote(), media_type=CONTENT_TYPE_LATEST)
        try:
            body = await _read_body(request, self.max_body_bytes)
        except APIError as exc:
            return error_response(exc.status, exc.message, exc.code)
        key = affinity_key(body) if self.prefix_affinity else None
        args = (request.method, request.url.path, request.url.query.encode(), list(request.headers.raw), body)
        for attempt in (1, 2):  # a replica that dies before answering: once more, on another
            stream = self.engine.handle_http.remote(*args, affinity_key=key)
            try:
                status, headers = await stream.__anext__()
                break
            except (RayActorError, ActorUnavailableError) as exc:
                stream.cancel()
                if attempt == 2:
                    return error_response(503, f"no engine replica could take the request: {exc}",
                                          "service_unavailable")
        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers)
        response = StreamingResponse(_relay(stream, sse), status_code=status)
        response.raw_headers = headers
        return response


# ---- building and running the application ------------------------------------------------------------------------
def build_app(engine_args: EngineArgs, settings: ServerSettings, scale: ScaleOut) -> serve.Application:
    """The application for the settings of `attamba serve`."""
    if not engine_args.threads:  # as many torch threads as the CPUs a replica reserves
        engine_args = replace(engine_args, threads=max(1, int(scale.replica_cpus)))
    app_kwargs = {"api_key": settings.api_key, "max_body_bytes": settings.max_body_bytes,
                  "served_model_name": settings.served_model_name, "allowed_origins": settings.allowed_origins,
                  "ui": settings.ui}
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scale.replica_cpus},
        # the engine's own waiting queue answers 429 beyond this, as the single process does
        "max_ongoing_requests": engine_args.max_num_seqs + engine_args.max_waiting,
        "graceful_shutdown_timeout_s": settings.grace_period + ABORT_WAIT_S,
    }
    if scale.autoscaling:
        options["autoscaling_config"] = scale.autoscaling_config()
    else:
        options["num_replicas"] = scale.num_replicas
    if scale.router == "prefix":
        options["request_router_config"] = RequestRouterConfig(request_router_class=PrefixAffinityRouter)
    hub = MetricsHub.bind()
    engine = AttambaEngine.options(**options).bind(engine_args, app_kwargs, hub)
    return AttambaIngress.bind(engine, hub, settings.max_body_bytes, scale.router == "prefix")


def build(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / KubeRay's serveConfigV2: `args` are `attamba serve` flags without
    their dashes (e.g. {"model": "checkpoints/attamba-wt2", "cache-memory": "1GiB", "replicas": 2}); a true
    value is a bare flag. --host, --port and --ray-address are the cluster's, not the application's."""
    import argparse

    parser = argparse.ArgumentParser(prog="server.ray_app:build")
    configure(parser)
    ns = parser.parse_args(flags_from(args))
    return build_app(from_args(EngineArgs, ns), from_args(ServerSettings, ns), from_args(ScaleOut, ns))


class _Signals:
    """SIGTERM / SIGINT as a count the main thread polls."""

    def __init__(self) -> None:
        self.count = 0
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, sig: int, frame: object) -> None:
        self.count += 1
        self.event.set()


def _drain(hub: DeploymentHandle, signals: _Signals, grace_period_s: float) -> None:
    """The single process's drain, for every replica: refuse new requests, let running ones finish for up to
    the grace period (or until a second signal), then abort what is left and give it ABORT_WAIT_S to end."""
    hub.set_phase.remote("draining").result()
    log.info("draining: refusing new requests, running ones get up to %g s to finish", grace_period_s)
    time.sleep(2 * REPORT_S)  # every replica has seen the phase and reported after it
    deadline = time.monotonic() + grace_period_s
    while hub.in_flight.remote().result() and time.monotonic() < deadline and signals.count < 2:
        time.sleep(REPORT_S)
    if hub.in_flight.remote().result():
        hub.set_phase.remote("abort").result()
        log.warning("aborting the requests still running")
        deadline = time.monotonic() + ABORT_WAIT_S + 2 * REPORT_S
        while hub.in_flight.remote().result() and time.monotonic() < deadline:
            time.sleep(REPORT_S)


def run(engine_args: EngineArgs, settings: ServerSettings, scale: ScaleOut) -> int:
    """Start (or join) a Ray cluster, deploy the application on --host/--port, serve until SIGTERM, drain."""
    engine_args = replace(engine_args, model=str(resolve_model(engine_args.model)))  # a named model: converted once
    app = build_app(engine_args, settings, scale)
    root = str(Path(__file__).resolve().parents[1])  # a local cluster's workers import this checkout first
    local = {} if scale.ray_address else {
        "num_cpus": max(len(os.sched_getaffinity(0)), math.ceil(scale.most_replicas * scale.replica_cpus)),
        "object_store_memory": OBJECT_STORE_BYTES, "include_dashboard": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                                                   if p)}}}
    ray.init(address=scale.ray_address, logging_level=logging.WARNING, **local)
    signals = _Signals()  # after ray.init, which installs its own SIGTERM handler
    try:
        logging_config = LoggingConfig(log_level=settings.log_level.upper(), enable_access_log=False)
        serve.start(http_options={"host": settings.host, "port": settings.port}, logging_config=logging_config)
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=logging_config)
        count = f"{scale.autoscale[0]}..{scale.autoscale[1]}" if scale.autoscaling else scale.num_replicas
        log.info("serving %s with %s replicas (%s router) on http://%s:%d; ray cluster at %s", engine_args.model,
                 count, scale.router, settings.host, settings.port, ray.get_runtime_context().gcs_address)
        while not signals.event.wait(0.5):
            pass
        _drain(serve.get_deployment_handle("MetricsHub", app_name=APP_NAME), signals, settings.grace_period)
        if scale.ray_address:  # a shared cluster keeps Serve and its other applications
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    finally:
        ray.shutdown()
    log.info("stopped")
    return 0
