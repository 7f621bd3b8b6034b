"""Prometheus metrics (prefix attamba_, label model_name), one registry per app.

Latency histograms and the success counter are observed per completion (each of a request's n
choices counts once, as vLLM counts its n child requests), from the server's view of the stream,
so `attamba_e2e_request_latency_seconds_count` equals the sum of `attamba_request_success_total`.
The gauges and the token / preemption counters are read from `engine.stats()` at scrape time.
No `_created` series are exported.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.outputs import StreamDelta

if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)


class EngineCollector(Collector):
    """Gauges and cumulative counters from one `engine.stats()` snapshot per scrape."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        gauges = [
            ("attamba_num_requests_running", "Requests running on the engine.", s.num_running),
            ("attamba_num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            ("attamba_cache_usage_perc", "Fraction (0..1) of the cache budget in use.", s.cache_usage),
            ("attamba_cache_bytes_used", "Bytes the live sequences hold (boundary KV, window, SSM and conv state).",
             s.cache_bytes_used),
            ("attamba_cache_bytes_full_kv_equivalent",
             "Bytes a full-KV transformer of the same dims would hold for the same tokens.",
             s.cache_bytes_full_kv_equivalent),
            ("attamba_prefix_cache_bytes", "Bytes of cached prefix blocks and state snapshots (held or evictable).",
             s.prefix_cache_bytes),
        ]
        counters = [
            ("attamba_prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens),
            ("attamba_generation_tokens", "Tokens generated.", s.generation_tokens),
            ("attamba_num_preemptions", "Sequences preempted.", s.num_preemptions),
            ("attamba_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries),
            ("attamba_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        for name, doc, value in counters:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class Metrics:
    """The registry an app serves on /metrics."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        disable_created_metrics()
        self.registry = CollectorRegistry()
        label = ["model_name"]
        self.ttft = Histogram("attamba_time_to_first_token_seconds", "Time to first token.", label,
                              registry=self.registry, buckets=TTFT_BUCKETS).labels(model_name)
        self.itl = Histogram("attamba_inter_token_latency_seconds", "Time between tokens of a completion.", label,
                             registry=self.registry, buckets=ITL_BUCKETS).labels(model_name)
        self.e2e = Histogram("attamba_e2e_request_latency_seconds", "Request arrival to last token.", label,
                             registry=self.registry, buckets=E2E_BUCKETS).labels(model_name)
        self.success = Counter("attamba_request_success", "Finished completions by finish reason.",
                               label + ["finish_reason"], registry=self.registry)
        self.model_name = model_name
        self.registry.register(EngineCollector(engine, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, n: int) -> RequestTimer:
        """Start timing a request with n completions (now = its arrival)."""
        return RequestTimer(self, n)


class RequestTimer:
    """Observes the TTFT, inter-token gaps and end-to-end latency of a request's n completions as their
    deltas arrive."""

    def __init__(self, metrics: Metrics, n: int) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.last_token: dict[int, float] = {}
        self.unfinished = set(range(n))

    def observe(self, delta: StreamDelta) -> None:
        now = time.monotonic()
        m = self.metrics
        if delta.token_ids:
            previous = self.last_token.get(delta.index)
            if previous is None:
                m.ttft.observe(now - self.arrival)
            else:
                gap = (now - previous) / len(delta.token_ids)
                for _ in delta.token_ids:
                    m.itl.observe(gap)
            self.last_token[delta.index] = now
        if delta.finish_reason is not None:
            self._finish(delta.index, delta.finish_reason, now)

    def _finish(self, index: int, reason: str, now: float) -> None:
        if index in self.unfinished:
            self.unfinished.discard(index)
            self.metrics.success.labels(self.metrics.model_name, reason).inc()
            self.metrics.e2e.observe(now - self.arrival)

    def close(self) -> None:
        """The request ended (or its client left): completions still open count as aborted."""
        now = time.monotonic()
        for index in list(self.unfinished):
            self._finish(index, "abort", now)
