"""The shipped Grafana dashboard queries only metrics the server exports."""
from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from engine import EngineArgs
from engine.async_engine import AsyncEngine
from server.metrics import Metrics
from conftest import ENGINE

DASHBOARD = Path(__file__).parent.parent / "deploy" / "monitoring" / "grafana-dashboard.json"


def test_dashboard_queries_exported_metrics(tiny_ckpt: Path) -> None:
    engine = AsyncEngine(EngineArgs(model=str(tiny_ckpt), **ENGINE))
    families = list(text_string_to_metric_families(Metrics(engine, "m").render().decode()))
    exported = {s.name for f in families for s in f.samples} | {f"{f.name}_total" for f in families
                                                                if f.type == "counter"}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {name for e in exprs for name in re.findall(r"attamba_\w+", e)}
    assert queried and queried <= exported, queried - exported
    for needed in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "num_requests_waiting",
                   "cache_bytes_used", "cache_bytes_full_kv_equivalent"):
        assert any(needed in name for name in queried), needed
    assert all('model_name="$model_name"' in e for e in exprs)
