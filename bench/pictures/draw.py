"""The engine pictures, drawn with matplotlib from what capture.py took from the engines.

Every figure is returned as well as saved, and every cell that stands for a KV block or a row of
the batch carries a `gid` naming it ("block-7", "row-shared-fees-3"), so a test can count what
was drawn against the engine state it was drawn from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from bench.pictures.capture import PoolView, Verification  # noqa: E402
from bench.timeline_chart import COLOURS, KINDS, LABELS  # noqa: E402
from common.timeline import Iteration  # noqa: E402

KIND_COLOUR = dict(zip(KINDS, COLOURS, strict=True))
STATE_COLOUR = {"free": "#ffffff", "cached": "#d9d9d9", "in use": "#9cc3e6", "shared": "#f2a65a"}
STATE_LABEL = {
    "free": "free",
    "cached": "free, still cached (its prefix can be found again)",
    "in use": "in use (1 reference)",
    "shared": "shared (count = references)",
}
SEQ_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
REJECTED = "#e06666"
KEPT = "#6aa84f"


def save(fig: Figure, path: Path | None) -> Figure:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def cell(ax, x: float, y: float, colour: str, gid: str, w: float = 1, **kw) -> Rectangle:
    rect = Rectangle((x, y), w, 1, facecolor=colour, edgecolor="#555555", lw=0.6, gid=gid, **kw)
    ax.add_patch(rect)
    return rect


def blank_axes(fig: Figure, rect=(0, 0, 1, 1)):
    ax = fig.add_axes(rect)
    ax.set_axis_off()
    ax.set_aspect("equal")
    return ax


# ---------------------------------------------------------------- the pool and block tables


def draw_pool(view: PoolView, title: str, path: Path | None = None, cols: int = 8) -> Figure:
    """Left: each running sequence's block table, the shared prefix drawn once above them;
    right: the pool as a grid of blocks; a line from each table entry to its block."""
    n = len(view.ref_counts)
    rows = -(-n // cols)
    shared = view.shared_prefix()
    own = {name: [b for b in table if b not in shared] for name, table in view.tables.items()}
    width = max([len(shared) // 2 + 1, *(len(t) for t in own.values())]) + 4
    fig = plt.figure(figsize=(13, max(4.5, rows * 0.6)))
    ax = blank_axes(fig)
    gx = width + 3  # the grid's left edge
    where = {b: (gx + b % cols, rows - 1 - b // cols) for b in range(n)}
    for b, (x, y) in where.items():
        state = view.state(b)
        cell(ax, x, y, STATE_COLOUR[state], f"block-{b}")
        refs = view.ref_counts[b]
        text = f"{b}\n×{refs}" if refs > 1 else str(b)
        ax.text(x + 0.5, y + 0.62, text, ha="center", va="center", fontsize=7)
    _draw_tables(ax, view, shared, own, where, rows)
    ax.set_xlim(-0.5, gx + cols + 0.5)
    ax.set_ylim(-1.6, rows + 1.9)
    ax.text(gx, rows + 1.0, f"the KV pool: {n} blocks × {view.block_size} token slots", fontsize=10)
    ax.text(0, rows + 1.0, "block tables (block ids in token order)", fontsize=10)
    handles = [Patch(facecolor=c, edgecolor="#555555", label=STATE_LABEL[s])
               for s, c in STATE_COLOUR.items()]  # fmt: skip
    ax.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def point(ax, start: tuple[float, float], cell_at: tuple[float, float], colour, alpha) -> None:
    """A table entry's line to its block in the pool, ending in a dot inside the block."""
    end = (cell_at[0] + 0.5, cell_at[1] + 0.3)
    ax.plot(*zip(start, end, strict=True), color=colour, lw=0.8, alpha=alpha, zorder=3)
    ax.plot(*end, "o", color=colour, ms=3, alpha=min(1, alpha + 0.3), zorder=3)


def _draw_tables(ax, view: PoolView, shared: list[int], own, where, rows: int) -> None:
    y: float = rows - 1
    if shared:  # the system prompt's blocks, once, in two rows of cells
        half = -(-len(shared) // 2)
        ax.text(0, y + 1.15, f"shared prefix: {len(shared)} blocks, held by every table that "
                "starts with it", fontsize=8)  # fmt: skip
        for i, b in enumerate(shared):
            x, yy = 3 + i % half, y - i // half
            cell(ax, x, yy, STATE_COLOUR["shared"], f"table-shared-{b}")
            ax.text(x + 0.5, yy + 0.5, str(b), ha="center", va="center", fontsize=6)
            point(ax, (x + 1, yy + 0.5), where[b], "#c0702a", 0.35)
        y -= 3
    for i, (name, blocks) in enumerate(own.items()):
        colour = SEQ_COLOURS[i % len(SEQ_COLOURS)]
        starts = shared and view.tables[name][: len(shared)] == shared
        label = f"{name}\n{view.computed[name]} tokens"
        ax.text(2.8, y + 0.5, label, ha="right", va="center", fontsize=7, color=colour)
        x = 3
        if starts:
            ax.text(x + 0.1, y + 0.5, "shared +", va="center", fontsize=7, color="#c0702a")
            x += 2
        for b in blocks:
            cell(ax, x, y, STATE_COLOUR[view.state(b)], f"table-{name}-{b}")
            ax.text(x + 0.5, y + 0.5, str(b), ha="center", va="center", fontsize=6)
            point(ax, (x + 1, y + 0.5), where[b], colour, 0.8)
            x += 1
        y -= 1.5


# ---------------------------------------------------------------- the batch of one iteration


def batch_rows(iteration: Iteration) -> list[tuple[str, str]]:
    """(request, what the row is) for each token row of the iteration's forward pass, in
    batch order: a drafted sequence's last real token, then its draft tokens."""
    rows = []
    for step in iteration.steps:
        if step.kind == "verify":
            rows.append((step.request_id, "verify"))
            rows += [(step.request_id, "draft")] * step.proposed
        elif step.tokens:
            rows += [(step.request_id, step.kind)] * step.tokens
    return rows


def draw_iteration(iteration: Iteration, title: str, path: Path | None = None) -> Figure:
    """The token budget as a grid of row slots, each filled by the row of the forward pass
    that took it: decode tokens, a drafted sequence's rows, a prefill chunk, or nothing."""
    cols = 16
    budget = max(iteration.budget, 1)
    rows = batch_rows(iteration)
    names = list(dict.fromkeys(r for r, _ in rows))
    fig = plt.figure(figsize=(11, 6.5))
    ax = blank_axes(fig, (0, 0.05, 0.6, 0.85))
    height = -(-budget // cols)
    for slot in range(budget):
        x, y = slot % cols, height - 1 - slot // cols
        if slot < len(rows):
            request, kind = rows[slot]
            colour = KIND_COLOUR["verify" if kind == "draft" else kind]
            hatch = "////" if kind == "draft" else None
            cell(ax, x, y, colour, f"row-{request}-{slot}", hatch=hatch)
            ax.text(x + 0.5, y + 0.5, str(names.index(request) + 1), ha="center", va="center",
                    fontsize=6, color="white")  # fmt: skip
        else:
            cell(ax, x, y, "#ffffff", f"slot-{slot}")
    ax.set_xlim(-0.2, cols + 0.2)
    ax.set_ylim(-0.2, height + 0.2)
    _iteration_legend(fig, iteration, names)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def _iteration_legend(fig: Figure, iteration: Iteration, names: list[str]) -> None:
    lines = [f"budget: {iteration.budget} rows; used: {iteration.num_tokens}", ""]
    for step in (s for s in iteration.steps if s.tokens):
        what = {
            "decode": "decode: 1 token",
            "prefill": f"prefill chunk: {step.tokens} tokens from position {step.position}",
            "verify": f"1 token + {step.proposed} draft tokens ({step.accepted} kept)",
        }.get(step.kind, f"{step.kind}: {step.tokens}")
        cached = f", {step.cached} prompt tokens from the prefix cache" if step.cached else ""
        lines.append(f"{names.index(step.request_id) + 1}  {step.request_id}: {what}{cached}")
    lines += ["", f"KV blocks in use after it: {iteration.kv_used} of {iteration.kv_total}"]
    fig.text(0.62, 0.85, "\n".join(lines), va="top", fontsize=9, family="monospace")
    handles = [Patch(facecolor=KIND_COLOUR[k], label=LABELS[k]) for k in ("decode", "prefill")]
    handles += [
        Patch(facecolor=KIND_COLOUR["verify"], label="last real token of a drafted sequence"),
        Patch(facecolor=KIND_COLOUR["verify"], hatch="////", label="draft token"),
        Patch(facecolor="#ffffff", edgecolor="#555555", label="unused budget"),
    ]
    fig.legend(handles=handles, loc="lower right", fontsize=8, frameon=False)


def draw_preemption(iterations: list[Iteration], title: str, path: Path | None = None) -> Figure:
    """Iterations down, the token budget across: each sequence's rows as a bar, the KV pool's
    use at the right, and the iteration where a sequence is preempted marked."""
    names = list(dict.fromkeys(s.request_id for it in iterations for s in it.steps))
    fig, (ax, kv) = plt.subplots(
        1, 2, figsize=(12, 0.32 * len(iterations) + 2), gridspec_kw={"width_ratios": [5, 1]},
        sharey=True,
    )  # fmt: skip
    for y, it in enumerate(iterations):
        x = 0
        for step in it.steps:
            colour = SEQ_COLOURS[names.index(step.request_id) % len(SEQ_COLOURS)]
            alpha = 1.0 if step.kind == "decode" else 0.45
            ax.barh(y, max(step.tokens, 1), left=x, color=colour, alpha=alpha, edgecolor="white",
                    gid=f"bar-{it.number}-{step.request_id}")  # fmt: skip
            if step.cached:
                ax.text(x + step.tokens + 2, y, f"+{step.cached} cached", va="center", fontsize=7)
            x += max(step.tokens, 1)
        for rid in it.preempted:
            ax.text(x + 3, y, f"preempted: {rid} (blocks freed, back to the queue)",
                    va="center", fontsize=8, color="#b00000", weight="bold")  # fmt: skip
        kv.barh(y, it.kv_used, color="#f2a65a" if it.preempted else "#9cc3e6")
        kv.barh(y, it.kv_total - it.kv_used, left=it.kv_used, color="#eeeeee")
    ax.set_yticks(range(len(iterations)), [f"#{it.number}" for it in iterations], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("symlog", linthresh=4)  # a decode row (1 token) stays visible beside 250
    ax.set_xlim(0, iterations[0].budget)
    ax.set_xlabel(f"rows of the forward pass (token budget: {iterations[0].budget}; "
                  "log scale past 4)")  # fmt: skip
    for y in range(1, len(iterations)):
        if iterations[y].number != iterations[y - 1].number + 1:
            ax.axhline(y - 0.5, color="#888888", ls=":", lw=1)  # iterations left out
    ax.set_ylabel("iteration")
    kv.set_xlabel(f"KV blocks in use (of {iterations[0].kv_total})")
    handles = [Patch(color=SEQ_COLOURS[i % len(SEQ_COLOURS)], label=n) for i, n in enumerate(names)]
    handles.append(Patch(color="#888888", alpha=0.45, label="prefill chunk (light)"))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


# ---------------------------------------------------------------- one verification


def draw_verifications(
    found: list[Verification], decode: Callable[[int], str], title: str, path: Path | None = None
) -> Figure:
    fig = plt.figure(figsize=(12, 2.3 * len(found)))
    for i, v in enumerate(found):
        top = 1 - i / len(found)
        ax = blank_axes(fig, (0, top - 1 / len(found), 1, 1 / len(found)))
        _draw_verification(ax, v, decode)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def _draw_verification(ax, v: Verification, decode: Callable[[int], str]) -> None:
    w = 1.6  # a token cell's width
    k = len(v.draft)
    word = lambda t: repr(decode(t))[1:-1][:9]  # noqa: E731
    ax.text(0, 5.2, f"{v.request}: {k} drafted, {v.accepted} kept", fontsize=10, weight="bold")
    ax.text(0, 3.5, "draft", fontsize=8)
    ax.text(0, 2.0, "target chose", fontsize=8)
    ctx_x = 2.2
    for j, t in enumerate(v.context):
        x = ctx_x + j * w
        cell(ax, x, 3, "#eeeeee", f"context-{j}", w=w)
        ax.text(x + w / 2, 3.5, word(t), ha="center", va="center", fontsize=7)
    start = ctx_x + len(v.context) * w + 0.4
    for j in range(k + 1):
        x = start + j * w
        if j < k:
            ok = j < v.accepted
            cell(ax, x, 3, KEPT if ok else ("#f4cccc" if j > v.accepted else REJECTED),
                 f"draft-{j}", w=w, hatch="////")  # fmt: skip
            ax.text(x + w / 2, 3.5, word(v.draft[j]), ha="center", va="center", fontsize=7)
        if j <= v.accepted:
            bonus = j == v.accepted
            cell(ax, x, 1.5, "#ffd966" if bonus else KEPT, f"chose-{j}", w=w)
            ax.text(x + w / 2, 2.0, word(v.kept[j]), ha="center", va="center", fontsize=7)
    note = ("all accepted: the last row's token is a bonus" if v.accepted == k
            else "first disagreement: the model's token replaces the draft; the rest is "
            "dropped")  # fmt: skip
    ax.text(start, 1.2, note, va="top", fontsize=7)
    _draw_slots(ax, v, start, w)
    ax.set_xlim(-0.2, start + (k + 1) * w + 14)
    ax.set_ylim(0.2, 5.8)


def _draw_slots(ax, v: Verification, x0: float, w: float) -> None:
    """The sequence's KV slots around the step: kept, written then rolled back, per block."""
    size = v.block_size
    first = v.computed_before // size * size  # the first slot of the block the step writes into
    end = -(-v.written // size) * size
    rolled = set(v.rolled_back_blocks())
    ax.text(x0 + (1 + len(v.draft)) * 1.6 + 1, 3.9, "KV slots of its blocks", fontsize=8)
    scale = 0.35
    base = x0 + (1 + len(v.draft)) * 1.6 + 1
    for slot in range(first, end):
        colour = ("#cccccc" if slot < v.computed_before else KEPT if slot < v.computed_after
                  else REJECTED if slot < v.written else "#ffffff")  # fmt: skip
        x = base + (slot - first) * scale
        cell(ax, x, 2.6, colour, f"slot-{slot}", w=scale)
    for i, block in enumerate(v.block_table[first // size : end // size]):
        x = base + i * size * scale
        label = f"block {block}" + (": rolled back" if block in rolled else "")
        ax.text(x, 2.3, label, fontsize=7, va="top", color=REJECTED if block in rolled else "k")
    ax.text(base, 1.9, "grey: computed before; green: kept; red: written, rolled back (written\n"
            "over next time; a block is named only once computed, so never offered)",
            fontsize=7, va="top")  # fmt: skip
