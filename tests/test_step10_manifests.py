"""Step 10's Kubernetes manifests, checked offline as step 9's are: every file validates
strictly, and the pieces fit: two pools, each behind the headless Service the router resolves,
running step 10's engine, and a router that sends to both."""

from __future__ import annotations

from pathlib import Path

import yaml

from step10_disaggregated.server import Config
from tests.test_step9_manifests import validate

DEPLOY = Path(__file__).resolve().parent.parent / "step10_disaggregated" / "deploy"
MANIFESTS = sorted(DEPLOY.glob("*.yaml"))


def resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_every_manifest_validates_strictly():
    assert len(MANIFESTS) == 4, MANIFESTS
    result = validate(*MANIFESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def container(r: dict, name: str) -> dict:
    return r[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]


def test_the_two_pools_and_the_router_fit_together():
    r = resources()
    for role in ("prefill", "decode"):
        engine = container(r, role)
        assert engine["command"][-1] == "step10_disaggregated.engine_server"
        assert engine["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        service = r[("Service", role)]["spec"]
        assert service["clusterIP"] == "None"
        assert service["selector"] == r[("Deployment", role)]["spec"]["selector"]["matchLabels"]
    router = container(r, "router")
    assert router["command"][-1] == "step10_disaggregated"
    env = {e["name"]: e["value"] for e in router["env"]}
    for role in ("prefill", "decode"):
        assert env[f"GATEWAY_{role.upper()}_UPSTREAMS"] == (
            f"dns://{role}.llm-gateway.svc.cluster.local:8000"
        )
    knobs = {f"GATEWAY_{name.upper()}" for name in Config.__dataclass_fields__}
    assert set(env) <= knobs  # every setting the router is given is one of its knobs
