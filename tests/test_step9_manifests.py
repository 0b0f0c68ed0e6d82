"""Step 9's Kubernetes manifests, checked offline: every file validates strictly against the
Kubernetes schemas of one version (kubernetes-validate --strict, which also refuses an unknown
field), the InferencePool path's custom resources against their published CRD schemas (committed
in deploy/inference-gateway/schemas/, made as strict), and the pieces fit together: the probes
and the drain, threads and resources, non-root pods, the headless Service the router resolves,
the metric the HPA scales on (which the engines must export), the embedded Prometheus
configuration, and the pool, picker and route of the Gateway API Inference Extension."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from step5_observability.metrics import Metrics
from step6_backpressure.lifecycle import LifecycleConfig
from step9_router.upstreams import UpstreamConfig
from tests.conftest import require_binary

DEPLOY = Path(__file__).resolve().parent.parent / "step9_router" / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))
GATEWAY = DEPLOY / "inference-gateway"
GATEWAY_MANIFESTS = sorted(GATEWAY.glob("*.yaml"))
# The oldest of the minor releases the Kubernetes project supported when it was pinned (1.35,
# 1.36, 1.37): what passes here applies to any of them.
KUBERNETES_VERSION = "1.35.0"
# The custom resources' kinds, each validated against its CRD's published schema.
CRD_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-v1.yaml",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-v1.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-v1.yaml",
}


def validator() -> str:
    beside = Path(sys.executable).parent / "kubernetes-validate"  # the venv's, if not on PATH
    return str(beside) if beside.exists() else require_binary("kubernetes-validate")


def validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [validator(), "--strict", "-k", KUBERNETES_VERSION, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def resources(paths: list[Path] = MANIFESTS) -> dict[tuple[str, str], dict]:
    found = {}
    for path in paths:
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
    startup = engines["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] == 300  # README: 5 minutes
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


@pytest.mark.parametrize("path", [*MANIFESTS, *GATEWAY_MANIFESTS], ids=lambda p: p.name)
def test_every_resource_is_in_the_namespace_or_cluster_wide(path):
    cluster_wide = {"Namespace", "ClusterRole", "ClusterRoleBinding", "APIService"}
    for doc in yaml.safe_load_all(path.read_text()):
        namespace = doc["metadata"].get("namespace")
        if doc["kind"] in cluster_wide:
            assert namespace is None
        else:
            assert namespace in ("llm-gateway", "kube-system"), (path.name, doc["kind"])


def containers(r: dict, deployment: str) -> list[dict]:
    return r[("Deployment", deployment)]["spec"]["template"]["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_engine_threads_follow_the_pods_cpu_limit():
    """torch sizes its pool to the node's cores unless told: OMP_NUM_THREADS comes from the
    pod's own CPU limit, and requests equal limits (Guaranteed: the cores are the pod's)."""
    (engine,) = containers(resources(), "engines")
    threads = env_of(engine)["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert threads == {"containerName": engine["name"], "resource": "limits.cpu", "divisor": "1"}
    assert engine["resources"]["requests"] == engine["resources"]["limits"]
    assert set(engine["resources"]["limits"]) == {"cpu", "memory"}


@pytest.mark.parametrize("deployment", ["engines", "router"])
def test_the_grace_period_covers_the_prestop_sleep_and_the_drain(deployment):
    """Kubernetes sends SIGTERM after the preStop hook and SIGKILL at the grace period's end:
    the drain (step 6's drain_timeout_s, as the pod sets it or by default) must fit between."""
    pod = resources()[("Deployment", deployment)]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = env_of(container).get("GATEWAY_DRAIN_TIMEOUT_S", {}).get("value")
    drain_s = float(drain) if drain is not None else LifecycleConfig().drain_timeout_s
    # Longer than a readiness poll of the router, so it has stopped sending before the drain.
    assert pre_stop > UpstreamConfig().health_interval_s
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain_s


def all_pods() -> list[tuple[str, dict]]:
    found = resources([*MANIFESTS, *GATEWAY_MANIFESTS]).items()
    deployments = [(name, doc) for (kind, name), doc in found if kind == "Deployment"]
    return [(name, doc["spec"]["template"]["spec"]) for name, doc in deployments]


@pytest.mark.parametrize("name,pod", all_pods(), ids=[name for name, _ in all_pods()])
def test_every_pod_runs_as_a_user_with_a_read_only_root_filesystem(name, pod):
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, (name, container["name"])
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]


def test_the_images_user_is_the_one_the_pods_run_as():
    dockerfile = (DEPLOY / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in dockerfile if line.startswith("USER ")]
    assert users == ["10001:10001"]
    assert dockerfile.index(f"USER {users[0]}") > max(
        i for i, line in enumerate(dockerfile) if line.startswith(("RUN python -m", "COPY"))
    )  # after everything is built as root: the user reads it and writes none of it
    for deployment in ("engines", "router"):
        pod = resources()[("Deployment", deployment)]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == 10001


def test_a_disruption_budget_keeps_all_but_one_engine_serving():
    r = resources()
    budget = r[("PodDisruptionBudget", "engines")]["spec"]
    assert budget["maxUnavailable"] == 1
    labels = r[("Deployment", "engines")]["spec"]["template"]["metadata"]["labels"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()


# ---------------------------------------------------------------- the InferencePool path


def strict(schema: dict) -> dict:
    """The schema, refusing a field it does not name, as the API server's strict field
    validation does (a CRD's schema leaves additionalProperties open; the server prunes)."""
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def crd_errors(doc: dict) -> list[str]:
    name = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    schema = strict(yaml.safe_load((GATEWAY / "schemas" / name).read_text()))
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


def split_by_schema(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """The custom resources, and the rest (Kubernetes' own kinds)."""
    custom: list[dict] = []
    builtin: list[dict] = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            is_custom = (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS
            (custom if is_custom else builtin).append(doc)
    return custom, builtin


def test_the_inference_gateway_manifests_validate_strictly(tmp_path):
    custom, builtin = split_by_schema(GATEWAY_MANIFESTS)
    assert {(d["apiVersion"], d["kind"]) for d in custom} == set(CRD_SCHEMAS)
    for doc in custom:
        assert crd_errors(doc) == [], (doc["kind"], doc["metadata"]["name"])
    rest = tmp_path / "builtin.yaml"
    rest.write_text(yaml.safe_dump_all(builtin))
    result = validate(rest)
    assert result.returncode == 0, result.stdout + result.stderr
    assert {d["kind"] for d in builtin} >= {"Deployment", "Service", "ConfigMap", "Role"}


@pytest.mark.parametrize(
    "kind,typo",
    [
        ("InferencePool", ("targetPorts:", "targetPort:")),  # a field the schema does not name
        ("InferencePool", ("number: 8000", "number: 80000")),  # out of range (1-65535)
        ("HTTPRoute", ("backendRefs:", "backendRef:")),
        ("Gateway", ("protocol: HTTP", "protocol: 'HTTP 1.1'")),  # not a protocol's pattern
    ],
)
def test_the_crd_validation_is_strict_enough_to_fail(kind, typo):
    custom, _ = split_by_schema(GATEWAY_MANIFESTS)
    (doc,) = [d for d in custom if d["kind"] == kind]
    broken = yaml.safe_load(yaml.safe_dump(doc).replace(*typo, 1))
    assert broken != doc
    assert crd_errors(broken)


def test_the_pool_the_picker_and_the_route_fit_the_engines():
    r = resources([*MANIFESTS, *GATEWAY_MANIFESTS])
    pool = r[("InferencePool", "engines")]["spec"]
    engines = r[("Deployment", "engines")]["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= engines["metadata"]["labels"].items()
    ports = {p["containerPort"] for p in engines["spec"]["containers"][0]["ports"]}
    assert {p["number"] for p in pool["targetPorts"]} <= ports
    picker = pool["endpointPickerRef"]
    service = r[("Service", picker["name"])]["spec"]
    assert picker["port"]["number"] in {p["port"] for p in service["ports"]}
    (epp,) = containers(r, picker["name"])
    assert "--pool-name=engines" in epp["args"] and "--pool-namespace=llm-gateway" in epp["args"]
    route = r[("HTTPRoute", "engines")]["spec"]
    (backend,) = route["rules"][0]["backendRefs"]
    assert (backend["kind"], backend["name"]) == ("InferencePool", "engines")
    assert (route["parentRefs"][0]["kind"], route["parentRefs"][0]["name"]) in r


def test_the_picker_reads_series_the_engines_export():
    config_map = resources(GATEWAY_MANIFESTS)[("ConfigMap", "engines-epp")]["data"]
    config = yaml.safe_load(config_map["plugins.yaml"])
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = extractor["parameters"]["engineConfigs"]
    assert extractor["parameters"]["defaultEngine"] == engine["name"]
    registry = CollectorRegistry()
    Metrics(registry)
    exported = {m.name for m in registry.collect()}
    named = {v for k, v in engine.items() if k.endswith("Spec") and v}
    assert named == {"gateway_requests_waiting", "gateway_requests_running"} and named <= exported
