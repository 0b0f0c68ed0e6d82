"""Two pictures read from the code's composition rather than drawn by hand.

- A request's path: step 6's `pipeline()` (which steps 7 and 8 import) is run with stand-ins
  that note each call, once for a response-cache miss and once for a hit, so the order and the
  short cut are the function's own. Validation before it and the stream after it are
  common/api.py's, the same for every step.
- Step 9's topology: the objects of the Kubernetes manifests in step9_router/deploy/, and the
  links between them found in the YAML: a Service's selector and the pods it picks, an address
  in a container's environment or arguments, Prometheus's pod discovery and the pods that ask to
  be scraped, the HPA's target and its custom-metrics source, the APIService's Service.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from step6_backpressure.server import pipeline

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "step9_router" / "deploy"


class _Stage:
    """A stand-in for one part of the pipeline: notes that it was called."""

    def __init__(self, calls: list[str], hit: bool = False) -> None:
        self.calls, self.hit = calls, hit

    async def answer(self, request: Any) -> bool:  # the response cache
        self.calls.append("response cache")
        return self.hit

    def admit(self, request: Any) -> None:  # the door
        self.calls.append("admission")

    async def submit(self, request: Any) -> None:  # the engine
        self.calls.append("engine")


def request_path(hit: bool) -> list[str]:
    """The stages a valid request passes, in order, as step 6's pipeline() calls them."""
    calls: list[str] = []
    submit = pipeline(_Stage(calls, hit), _Stage(calls), _Stage(calls))  # type: ignore[arg-type]
    asyncio.run(submit(object()))  # type: ignore[arg-type]
    return ["validate", *calls, "stream"]


def steps_using_pipeline() -> list[str]:
    """The steps whose server imports step 6's pipeline (or is step 6), directly or through the
    server of a step it builds on (step 8's server subclasses step 7's)."""
    found = ["step6_backpressure"]
    for server in sorted(ROOT.glob("step*_*/server.py"), key=lambda p: _step_number(p.parent)):
        text = server.read_text()
        direct = "from step6_backpressure.server import pipeline" in text
        inherited = any(
            f"from {step} import server" in text or f"from {step}.server import" in text
            for step in found[1:]
        )
        if direct or inherited:
            found.append(server.parent.name)
    return found


def _step_number(folder: Path) -> int:
    return int(folder.name.split("_")[0].removeprefix("step"))


# ---------------------------------------------------------------- step 9's manifests


@dataclass
class Topology:
    objects: list[dict] = field(default_factory=list)  # every manifest document
    nodes: list[str] = field(default_factory=list)  # "Kind/name" drawn as boxes
    edges: list[tuple[str, str, str]] = field(default_factory=list)  # (from, to, how)

    def kinds(self) -> dict[str, list[str]]:
        by_kind: dict[str, list[str]] = defaultdict(list)
        for obj in self.objects:
            by_kind[obj["kind"]].append(obj["metadata"]["name"])
        return dict(by_kind)


def load_manifests(folder: Path = DEPLOY) -> list[dict]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _key(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"].get("labels", {})


def _containers(obj: dict) -> list[dict]:
    return obj["spec"]["template"]["spec"].get("containers", [])


def _addresses(obj: dict) -> str:
    """Everything a Deployment's containers are told: env values and arguments."""
    parts = []
    for c in _containers(obj):
        parts += [str(e.get("value", "")) for e in c.get("env", [])]
        parts += [str(a) for a in c.get("args", [])]
    return " ".join(parts)


def topology(folder: Path = DEPLOY) -> Topology:
    objects = load_manifests(folder)
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for obj in objects:
        by_kind[obj["kind"]].append(obj)
    deployments, services = by_kind["Deployment"], by_kind["Service"]
    top = Topology(objects)
    top.nodes = [_key(o) for o in deployments + services + by_kind["HorizontalPodAutoscaler"]]
    top.nodes += [_key(o) for o in by_kind["APIService"]]
    for svc in services:
        selector = svc["spec"].get("selector", {})
        for dep in deployments:
            if selector and selector.items() <= _pod_labels(dep).items():
                top.edges.append((_key(svc), _key(dep), "selects"))
    for dep in deployments:
        told = _addresses(dep)
        for svc in services:
            name = re.escape(svc["metadata"]["name"])
            if re.search(rf"//{name}[.:]", told):
                top.edges.append((_key(dep), _key(svc), "calls"))
    top.edges += _scrapes(deployments, by_kind["ConfigMap"])
    top.edges += _autoscaling(by_kind["HorizontalPodAutoscaler"], by_kind["APIService"])
    called = {b for _, b, how in top.edges if how in ("calls", "serves")}
    entries = [_key(svc) for svc in services if _key(svc) not in called]
    if entries:  # a Service nothing in the cluster calls is what clients call
        top.nodes.insert(0, "client")
        top.edges += [("client", svc, "calls") for svc in entries]
    return top


def _scrapes(deployments: list[dict], configmaps: list[dict]) -> list[tuple[str, str, str]]:
    """A Deployment that mounts a Prometheus config discovering pods scrapes every Deployment
    whose pods carry prometheus.io/scrape: "true"."""
    discovering = {
        c["metadata"]["name"]
        for c in configmaps
        if any("kubernetes_sd_configs" in str(v) for v in c.get("data", {}).values())
    }
    edges = []
    for dep in deployments:
        volumes = dep["spec"]["template"]["spec"].get("volumes", [])
        if not any(v.get("configMap", {}).get("name") in discovering for v in volumes):
            continue
        for target in deployments:
            notes = target["spec"]["template"]["metadata"].get("annotations", {})
            if str(notes.get("prometheus.io/scrape")) == "true":
                edges.append((_key(dep), _key(target), "scrapes"))
    return edges


def _autoscaling(hpas: list[dict], apis: list[dict]) -> list[tuple[str, str, str]]:
    edges = []
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        edges.append((_key(hpa), f"{target['kind']}/{target['name']}", "scales"))
        if any(m["type"] in ("Pods", "Object") for m in hpa["spec"].get("metrics", [])):
            for api in apis:
                if api["spec"].get("group") == "custom.metrics.k8s.io":
                    edges.append((_key(hpa), _key(api), "reads metrics"))
    for api in apis:
        svc = api["spec"].get("service") or {}
        if svc.get("name"):
            edges.append((_key(api), f"Service/{svc['name']}", "serves"))
    return edges
