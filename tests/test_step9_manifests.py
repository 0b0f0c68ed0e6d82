"""Step 9's Kubernetes manifests, checked offline: every file validates strictly against the
Kubernetes schemas (kubernetes-validate --strict, which also refuses an unknown field), and the
pieces fit together: the probes, the headless Service the router resolves, the metric the HPA
scales on (which the engines must export), and the embedded Prometheus configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from step5_observability.metrics import Metrics
from tests.conftest import require_binary

DEPLOY = Path(__file__).resolve().parent.parent / "step9_router" / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def validator() -> str:
    beside = Path(sys.executable).parent / "kubernetes-validate"  # the venv's, if not on PATH
    return str(beside) if beside.exists() else require_binary("kubernetes-validate")


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [validator(), "--strict", *map(str, paths)], capture_output=True, text=True, timeout=120
    )


def resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_every_manifest_validates_strictly():
    assert len(MANIFESTS) >= 7, MANIFESTS
    result = validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout + result.stderr


def test_the_validator_is_strict_enough_to_fail(tmp_path):
    engines = (DEPLOY / "engines.yaml").read_text()
    broken = tmp_path / "broken.yaml"
    broken.write_text(engines.replace("readinessProbe:", "readinessProbes:", 1))  # a typo
    assert validate(broken).returncode != 0


def test_the_pieces_fit_together():
    r = resources()
    engines = r[("Deployment", "engines")]["spec"]["template"]["spec"]["containers"][0]
    assert engines["command"][-1] == "step8_speculative"
    assert engines["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert engines["startupProbe"]["failureThreshold"] * engines["startupProbe"]["periodSeconds"]
    service = r[("Service", "engines")]["spec"]
    assert service["clusterIP"] == "None"  # headless: DNS lists every ready pod
    router = r[("Deployment", "router")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in router["env"]}
    assert env["GATEWAY_UPSTREAMS"] == "dns://engines.llm-gateway.svc.cluster.local:8000"
    assert env["GATEWAY_REDIS_URL"].startswith("redis://redis.llm-gateway.svc")
    assert ("Service", "redis") in r and ("Service", "router") in r


def test_the_hpa_scales_the_engines_on_a_metric_they_export():
    r = resources()
    hpa = r[("HorizontalPodAutoscaler", "engines")]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "engines"
    metric = hpa["metrics"][0]["pods"]["metric"]["name"]
    registry = CollectorRegistry()
    Metrics(registry)  # the series every step from 5 on exports, step 7's engines included
    assert metric in {m.name for m in registry.collect()}
    adapter = yaml.safe_load(r[("ConfigMap", "prometheus-adapter-config")]["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == metric


def test_prometheus_labels_each_series_with_the_pod_the_adapter_maps_it_to():
    config = yaml.safe_load(
        resources()[("ConfigMap", "prometheus-config")]["data"]["prometheus.yml"]
    )
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["role"] == "pod"
    targets = {rule.get("target_label") for rule in job["relabel_configs"]}
    assert {"namespace", "pod"} <= targets  # the adapter's resource overrides name these
    for deployment in ("engines", "router"):
        template = resources()[("Deployment", deployment)]["spec"]["template"]["metadata"]
        assert template["annotations"]["prometheus.io/scrape"] == "true"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_resource_is_in_the_namespace_or_cluster_wide(path):
    cluster_wide = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService"}
    for doc in yaml.safe_load_all(path.read_text()):
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_wide:
            assert namespace is None
        else:
            assert namespace in ("llm-gateway", "kube-system"), (path.name, doc["kind"])
