"""The request's path and step 9's topology, drawn from bench/pictures/topology.py's readings.

In the topology, a Service and the Deployment it selects are one box (the Service's name and
port under the Deployment's), and boxes stand in columns by how far down the chain of links
they are: whatever links to a box stands to its left.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from bench.pictures.draw import blank_axes, plt, save
from bench.pictures.topology import Topology

EDGE_STYLE = {
    "calls": ("#1f4e79", "-"),
    "scrapes": ("#c55a11", "--"),
    "scales": ("#548235", "-."),
    "reads metrics": ("#7030a0", ":"),
    "serves": ("#7030a0", ":"),
}


W, H = 3.0, 1.0  # a box, in data units


def box(ax, x: float, y: float, text: str, gid: str, colour: str = "#deebf7", w=W, h=H):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.08",
                                facecolor=colour, edgecolor="#444444", gid=gid))  # fmt: skip
    ax.text(x, y, text, ha="center", va="center", fontsize=7.5)


def arrow(ax, a, b, colour="#333333", style="-", label="", rad=0.0, w=W) -> None:
    """From box centre a to box centre b, edge to edge: sideways between columns, down or up
    within one."""
    (ax_, ay), (bx, by) = a, b
    if rad:  # an arc, from the top of one box to the top of the other
        a, b = (ax_, ay + H / 2), (bx, by + H / 2)
    elif abs(bx - ax_) > 0.1:
        side = w / 2 if bx > ax_ else -w / 2
        a, b = (ax_ + side, ay), (bx - side, by)
    else:
        side = H / 2 if by < ay else -H / 2
        a, b = (ax_, ay - side), (bx, by + side)
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=11, color=colour,
                                 linestyle=style, connectionstyle=f"arc3,rad={rad}",
                                 shrinkA=2, shrinkB=2))  # fmt: skip
    if label:  # at the arc's apex (arc3's control point is rad * (dy, -dx) off the middle)
        dx, dy = b[0] - a[0], b[1] - a[1]
        x, y = (a[0] + b[0]) / 2 + rad * dy / 2, (a[1] + b[1]) / 2 - rad * dx / 2
        ax.text(x, y + 0.08, label, ha="center", va="bottom", fontsize=7, color=colour)


def draw_request_path(miss: list[str], hit: list[str], steps: list[str],
                      path: Path | None = None) -> Figure:  # fmt: skip
    """The stages in pipeline order; the hit's short cut drawn from where it leaves."""
    fig = plt.figure(figsize=(12, 3))
    ax = blank_axes(fig)
    xs = {stage: 1.6 + 3.2 * i for i, stage in enumerate(miss)}
    for stage, x in xs.items():
        box(ax, x, 0, stage, f"stage-{stage}", w=2.4)
    for a, b in zip(miss, miss[1:], strict=False):
        arrow(ax, (xs[a], 0), (xs[b], 0), w=2.4)
    for a, b in zip(hit, hit[1:], strict=False):
        if miss.index(b) != miss.index(a) + 1:
            arrow(ax, (xs[a], 0.3), (xs[b], 0.3), "#c55a11", "--", "a hit: answered from the "
                  "response cache", rad=-0.2, w=2.4)  # fmt: skip
    ax.text(0.3, -1.3, "validate and stream: common/api.py, every step; between them the "
            "order of step 6's pipeline(), as run\nby it (a miss, and a hit), used by "
            + ", ".join(steps), fontsize=8, va="top")  # fmt: skip
    ax.set_xlim(0, xs[miss[-1]] + 1.6)
    ax.set_ylim(-2.2, 2.2)
    return save(fig, path)


def _merged(top: Topology) -> tuple[dict[str, str], dict[str, str]]:
    """(node -> the box it is drawn in, box -> its text): a Service joins its Deployment."""
    into = {n: n for n in top.nodes}
    for a, b, how in top.edges:
        if how == "selects":
            into[a] = b
    text: dict[str, str] = {}
    docs = {f"{o['kind']}/{o['metadata']['name']}": o for o in top.objects}
    for node, target in into.items():
        if node == target:
            text[node] = _label(node, docs.get(node))
    for node, target in into.items():
        if node != target:
            port = docs[node]["spec"]["ports"][0]["port"]
            text[target] += f"\nService {node.split('/')[1]}:{port}"
    return into, text


def _label(node: str, doc: dict | None) -> str:
    if doc is None:
        return node
    kind, name = node.split("/")
    if kind == "Deployment":
        spec = doc["spec"]
        image = spec["template"]["spec"]["containers"][0]["image"].split("/")[-1]
        return f"Deployment {name} ×{spec.get('replicas', 1)}\n{image}"
    if kind == "HorizontalPodAutoscaler":
        spec = doc["spec"]
        return f"HPA {name}\n{spec['minReplicas']}..{spec['maxReplicas']} replicas"
    if kind == "APIService":
        return f"APIService\n{doc['spec'].get('group')}"
    return f"{kind} {name}"


def _columns(boxes: list[str], links: list[tuple[str, str, str]]) -> dict[str, int]:
    """Longest-path layering; an entry (no links in) stands just left of what it links to."""
    column = dict.fromkeys(boxes, 0)
    for _ in boxes:
        for a, b, _how in links:
            column[b] = max(column[b], column[a] + 1)
    for node in boxes:
        outs = [column[b] for a, b, _ in links if a == node]
        if outs and not any(b == node for _, b, _h in links):
            column[node] = min(outs) - 1
    return column


def draw_topology(top: Topology, path: Path | None = None) -> Figure:
    into, text = _merged(top)
    boxes = list(text)
    links = list(dict.fromkeys((into[a], into[b], how) for a, b, how in top.edges
                               if how != "selects"))  # fmt: skip
    column = _columns(boxes, links)
    where, used = {}, dict.fromkeys(column.values(), 0)
    for node in sorted(boxes, key=lambda n: (column[n], n)):
        where[node] = (1.8 + 3.8 * column[node], -1.9 * used[column[node]])
        used[column[node]] += 1
    fig = plt.figure(figsize=(15, 2.4 + 1.2 * max(used.values())))
    ax = blank_axes(fig)
    for node, (x, y) in where.items():
        colour = "#fff2cc" if node == "client" else "#deebf7"
        box(ax, x, y, text[node], f"box-{node}", colour)
    for a, b, how in links:
        colour, style = EDGE_STYLE.get(how, ("#333333", "-"))
        span = abs(column[b] - column[a])
        rad = -0.6 / span if span > 1 else 0.0  # a long link arcs over the row between
        arrow(ax, where[a], where[b], colour, style, how, rad=rad)
    bottom = min(y for _, y in where.values())
    _others(ax, top, set(into), bottom - 1.0)
    ax.set_xlim(0, 3.8 * max(column.values()) + 3.6)
    ax.set_ylim(bottom - 1.6, 2.4)
    return save(fig, path)


def _others(ax, top: Topology, drawn: set[str], y: float) -> None:
    rest = [f"{kind} ×{len(names)}" if len(names) > 1 else f"{kind} {names[0]}"
            for kind, names in top.kinds().items()
            if not all(f"{kind}/{n}" in drawn for n in names)]  # fmt: skip
    ax.text(0.3, y, "also in step9_router/deploy/: " + ", ".join(rest), fontsize=8, va="top")
