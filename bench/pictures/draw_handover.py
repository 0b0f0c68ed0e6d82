"""Step 10's hand-over, drawn from bench/pictures/handover.py's reading of both engines.

The two pools side by side, an arrow from each prefill block whose keys and values moved to the
decode block they went into; under each pool, the prompt's blocks in token order; under those,
the transfer's numbers and the lease. Cells carry gids ("prefill-block-7", "decode-block-3",
"moved-0", "prefill-prompt-7", "decode-prompt-3") so a test can count them against the engines.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Patch

from bench.pictures.capture import PoolView
from bench.pictures.draw import STATE_COLOUR, blank_axes, cell, plt, save
from bench.pictures.handover import Handover

MOVED = "#e07b24"  # keys and values that crossed: the prefill block read, the decode block written
LEASED = "#f9d2ad"  # under the lease, not read: the decode engine had these already
KEPT = "#8fc17a"  # the decode engine's own prefix cache held these: not moved
COLS = 8  # blocks per row of a pool grid
GAP = 7  # between the two grids, in cells


def prefill_colour(h: Handover, block: int) -> str:
    if block in h.sent:
        return MOVED
    return LEASED if block in h.leased else other(h.prefill, block)


def decode_colour(h: Handover, block: int) -> str:
    if block in h.taken_in:
        return MOVED
    return KEPT if block in h.kept else other(h.decode, block)


def other(view: PoolView, block: int) -> str:
    """A block the hand-over does not touch: in use (by any number of references), or free."""
    return STATE_COLOUR["in use" if view.ref_counts[block] else view.state(block)]


def draw_handover(h: Handover, title: str, path: Path | None = None) -> Figure:
    n = len(h.prefill.ref_counts)
    rows = -(-n // COLS)
    fig = plt.figure(figsize=(13, 8.5))
    ax = blank_axes(fig)
    right = COLS + GAP  # the decode grid's left edge
    at_p = _grid(ax, h.prefill.ref_counts, 0, rows, "prefill", lambda b: prefill_colour(h, b))
    at_d = _grid(ax, h.decode.ref_counts, right, rows, "decode", lambda b: decode_colour(h, b))
    for i, (src, dst) in enumerate(zip(h.sent, h.taken_in, strict=True)):
        a, b = (at_p[src][0] + 0.5, at_p[src][1] + 1), (at_d[dst][0] + 0.5, at_d[dst][1] + 1)
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=10, color=MOVED,
                                     lw=1.2, connectionstyle="arc3,rad=-0.25", zorder=4,
                                     gid=f"moved-{i}"))  # fmt: skip
    size = h.block_size
    ax.text(0, rows + 0.6, f"prefill engine: {n} blocks × {size} token slots", fontsize=10)
    ax.text(right, rows + 0.6, f"decode engine: {len(h.decode.ref_counts)} blocks × {size} "
            "token slots", fontsize=10)  # fmt: skip
    ax.text(COLS + GAP / 2, rows / 2, _transfer_label(h), ha="center", va="center",
            fontsize=9, color=MOVED, weight="bold")  # fmt: skip
    _prompt_strips(ax, h, right, -1.6)
    _notes(ax, h, -2.4)
    ax.set_xlim(-0.5, right + COLS + 0.5)
    ax.set_ylim(-6.0, rows + 1.6)
    _legend(ax)
    fig.suptitle(title, fontsize=11)
    return save(fig, path)


def _grid(ax, refs: list[int], x0: float, rows: int, side: str, colour) -> dict:
    """One pool as a grid of blocks, block 0 top left; where each block's cell is."""
    where = {b: (x0 + b % COLS, rows - 1 - b // COLS) for b in range(len(refs))}
    for b, (x, y) in where.items():
        cell(ax, x, y, colour(b), f"{side}-block-{b}")
        text = f"{b}\n×{refs[b]}" if refs[b] > 1 else str(b)
        ax.text(x + 0.5, y + 0.5, text, ha="center", va="center", fontsize=7)
    return where


def _transfer_label(h: Handover) -> str:
    slots = len(h.taken_in) * h.block_size
    return (f"{len(h.taken_in)} blocks moved ──►\n{h.moved_tokens} tokens in {slots} slots\n"
            f"× {h.bytes_per_token:,} B = {h.moved_bytes:,} B\n\n"
            f"lease: held, then {h.release}")  # fmt: skip


def _prompt_strips(ax, h: Handover, right: float, y: float) -> None:
    """The prompt's handed-over blocks in token order, as each engine holds them."""
    w = COLS / len(h.leased)
    last = f", the last with {h.partial} tokens" if h.partial else ""
    ax.text(0, y + 1.15, f"{h.request}: its {len(h.leased)} blocks under the lease{last}, in "
            "token order", fontsize=8)  # fmt: skip
    ax.text(right, y + 1.15, f"the same blocks in the decode engine: {len(h.kept)} its own, "
            f"{len(h.taken_in)} taken in", fontsize=8)  # fmt: skip
    for i, (p, d) in enumerate(zip(h.leased, h.kept + h.taken_in, strict=True)):
        cell(ax, i * w, y, prefill_colour(h, p), f"prefill-prompt-{p}", w=w)
        cell(ax, right + i * w, y, decode_colour(h, d), f"decode-prompt-{d}", w=w)
        ax.text(i * w + w / 2, y + 0.5, str(p), ha="center", va="center", fontsize=5.5)
        ax.text(right + i * w + w / 2, y + 0.5, str(d), ha="center", va="center", fontsize=5.5)


def _notes(ax, h: Handover, y: float) -> None:
    full = len(h.leased) - bool(h.partial)
    partial = f" and a partial one of {h.partial}" if h.partial else ""
    lines = [
        f"prompt: {h.prompt_tokens} tokens; handed over: all but the last token "
        f"({h.handed_tokens}), {full} full blocks{partial}",
        f"not moved: {len(h.kept)} blocks ({len(h.kept) * h.block_size} tokens) the decode "
        "engine's prefix cache found (lookup), from an earlier chat with the same system prompt",
        f"moved: {len(h.taken_in)} blocks, {h.moved_tokens} tokens; whole blocks cross, "
        f"{len(h.taken_in) * h.block_size} slots × {h.bytes_per_token:,} B (K and V, every layer)",
        f"= {h.moved_bytes:,} B, written into fresh blocks, the full ones named",
        f"lease on the prefill engine: held, {h.lease_left_s:.1f} s of {h.lease_s:g} s left; "
        f"the decode engine's next call ends it ({h.release})",
        f"then the decode engine computes the last {h.computed_on_decode} prompt token(s) itself "
        "and samples every output token",
    ]
    ax.text(0, y, "\n".join(lines), va="top", fontsize=8.5, family="monospace", linespacing=1.6)


def _legend(ax) -> None:
    states = [
        (MOVED, "moved: read from the prefill block, written into the decode block"),
        (LEASED, "under the lease, not read (the decode engine had it)"),
        (KEPT, "the decode engine's own cached block, not moved"),
        (STATE_COLOUR["in use"], "in use"),
        (STATE_COLOUR["cached"], "free, still cached"),
        (STATE_COLOUR["free"], "free"),
    ]
    handles = [Patch(facecolor=c, edgecolor="#555555", label=label) for c, label in states]
    ax.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False,
              bbox_to_anchor=(0.5, 0.0))  # fmt: skip
