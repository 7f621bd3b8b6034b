"""The Kubernetes manifests in deploy/ point at this project's real import paths, flags, ports and metrics."""
from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from engine.settings import from_args
from server.scale_out import ScaleOut, flags_from
from server.serve import configure

yaml = pytest.importorskip("yaml")  # PyYAML comes with the dev extras (transformers, schemathesis)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
IMAGE_WORKDIR = "/app"  # the Dockerfile's WORKDIR


def documents(path: Path) -> dict[str, dict]:
    """The manifests of a file by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def serve_args(argv: list[str]) -> argparse.Namespace:
    """`attamba serve` flags parsed as the CLI parses them (an unknown flag or bad value fails the test)."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    configure(parser)
    return parser.parse_args(argv)


def entrypoint() -> list[str]:
    line = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("ENTRYPOINT"))
    return ast.literal_eval(line.removeprefix("ENTRYPOINT").strip())


def repo_path(model: str) -> Path:
    return ROOT / model.removeprefix(IMAGE_WORKDIR + "/")


def test_rayservice_runs_this_projects_application_builder() -> None:
    service = documents(DEPLOY / "kuberay" / "rayservice.yaml")["RayService"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, _, attr = app["import_path"].partition(":")
    source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
    assert re.search(rf"^def {attr}\(args: dict", source, re.M), app["import_path"]
    args = serve_args(flags_from(app["args"]))
    scale = from_args(ScaleOut, args)
    assert scale.autoscaling and (repo_path(args.model) / "config.json").is_file()
    port = serve_config["http_options"]["port"]
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert port in [p["containerPort"] for p in head["ports"]]
    (engines,) = cluster["workerGroupSpecs"]
    worker_cpus = float(engines["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"])
    replicas_per_pod = worker_cpus // scale.replica_cpus
    assert replicas_per_pod * engines["maxReplicas"] >= scale.most_replicas  # the pods can hold every replica
    pinned = re.search(r'"ray\[serve\]>=([\d.]+),<(\d+)"', (ROOT / "pyproject.toml").read_text())
    version = tuple(int(x) for x in cluster["rayVersion"].split("."))
    assert pinned and tuple(int(x) for x in pinned.group(1).split(".")) <= version < (int(pinned.group(2)),)


def test_kubernetes_deployment_service_and_hpa_fit_the_server() -> None:
    docs = documents(DEPLOY / "kubernetes" / "attamba.yaml")
    deployment, service, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    command = entrypoint()
    assert command[:2] == ["attamba", "serve"]
    args = serve_args(command[2:] + container["args"])
    assert not from_args(ScaleOut, args).enabled  # the single process, no Ray
    assert (repo_path(args.model) / "config.json").is_file()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace_period + 2  # drain, then abort
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == "attamba_num_requests_waiting" and f'"{name}"' in (ROOT / "server" / "metrics.py").read_text()
    rules = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter-rules.yaml").read_text())
    assert any(name in rule["seriesQuery"] for rule in rules["rules"]["custom"])


@pytest.mark.parametrize("args", [{"replicas": 0}, {"autoscale": "4:1"}, {"router": "random"}, {"no-such-flag": 1}])
def test_bad_application_args_are_refused(args: dict) -> None:
    with pytest.raises((argparse.ArgumentError, ValueError, SystemExit)):
        from_args(ScaleOut, serve_args(flags_from({"model": "checkpoints/attamba-wt2", **args})))
