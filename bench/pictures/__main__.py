"""`python -m bench.pictures [GROUP ...] [--out DIR]`: draw the engine pictures the READMEs show.

Runs step 7's, step 8's and step 10's engines in-process on the real model (float32, from the
local cache) with the bench's chat prompts, stops them at chosen moments and draws what their
state says:

    pool.png          the KV pool and four sequences' block tables (step 7)
    iteration.png     one iteration's rows against the token budget (step 8: drafts, a chunk)
    preemption.png    a pool too small for three growing sequences (step 7)
    verification.png  two verifications: a draft cut short, and one kept whole (step 8)
    request-path.png  a request's way through steps 6-8 (read from step 6's pipeline())
    topology.png      step 9's Kubernetes objects and their links (read from deploy/*.yaml)
    handover.png      a prompt's KV blocks handed from a prefill engine to a decode engine (step 10)

Which to draw: `code` (the two read from the code, no model needed), `engines` (steps 7 and 8),
`handover` (step 10); all three when none is named.

Greedy decoding makes the engine's moves the same on every run with the same model and code;
the pictures' captions name the commit that drew them.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench.pictures import capture, draw, draw_handover, draw_topology, handover, topology
from common.config import ServerConfig
from common.model import LoadedModel, load_model
from common.timeline import Iteration
from step7_real_kv.engine import EngineConfig, PagedEngine
from step8_speculative.engine import SpeculativeConfig, SpeculativeEngine
from step10_disaggregated.engine import DisaggEngine, local_engines

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "charts" / "pictures"
POOL_BLOCKS = 64  # a pool small enough to see each block: 8 x 8
TIGHT_BLOCKS = 26  # three prompts of 252, 72 and 37 tokens fill all but 2 blocks
GROUPS = ("code", "engines", "handover")


def engine_pictures(lm: LoadedModel, out: Path, config: dict | None = None) -> dict[str, object]:
    """Run the three scenes and draw them; returns what was drawn, for tests."""
    config = config or {}
    pool = asyncio.run(
        capture.pool_scene(PagedEngine(lm, EngineConfig(num_kv_blocks=POOL_BLOCKS, **config)), lm)
    )
    view = pool.pools["decoding"]
    draw.draw_pool(view, "step 7: the KV pool while four chats decode", out / "pool.png")
    spec = SpeculativeEngine(lm, SpeculativeConfig(num_kv_blocks=256, **config))
    batch = asyncio.run(capture.batch_scene(spec, lm))
    mixed = richest(batch.iterations)
    draw.draw_iteration(mixed, f"step 8: iteration #{mixed.number}, rows against the token "
                        "budget", out / "iteration.png")  # fmt: skip
    tight = PagedEngine(lm, EngineConfig(num_kv_blocks=TIGHT_BLOCKS, **config))
    preempt = asyncio.run(capture.preempt_scene(tight, lm))
    window = around_preemption(preempt.iterations)
    draw.draw_preemption(window, f"step 7: {TIGHT_BLOCKS} KV blocks for three growing "
                         "sequences", out / "preemption.png")  # fmt: skip
    chosen = pick_verifications(batch.verifications)
    title = "step 8: speculative verification"
    decode = lambda t: str(lm.tokenizer.decode([t]))  # noqa: E731
    draw.draw_verifications(chosen, decode, title, out / "verification.png")
    return {"pool": view, "iteration": mixed, "preemption": window, "verifications": chosen}


def richest(iterations: list[Iteration]) -> Iteration:
    """The first iteration with the most kinds of rows (decode, verify, prefill), then the
    most rows."""
    return max(iterations, key=lambda it: (len({s.kind for s in it.steps}), it.num_tokens))


def around_preemption(iterations: list[Iteration], before: int = 3) -> list[Iteration]:
    """The first two iterations (the prompts going in), then from a few before the first
    preemption to the end."""
    first = next(i for i, it in enumerate(iterations) if it.preempted)
    return iterations[:2] + iterations[max(2, first - before) :]


def pick_verifications(found: list[capture.Verification]) -> list[capture.Verification]:
    """A draft cut short after some were kept, one whose rejection rolls a block back, and
    one kept whole (those of them that happened)."""
    partial = [v for v in found if 0 < v.accepted < len(v.draft)]
    rolled = [v for v in found if v.rolled_back_blocks()]
    whole = [v for v in found if v.accepted == len(v.draft)]
    chosen: list[capture.Verification] = []
    for group in (partial, rolled, whole):
        if group and not any(group[0] is v for v in chosen):
            chosen.append(group[0])
    return chosen


def handover_picture(lm: LoadedModel, out: Path, config: dict | None = None) -> handover.Handover:
    """Step 10: two chats through a prefill and a decode engine; the second's hand-over."""
    seen = asyncio.run(handover.handover_scene(*handover_engines(lm, config), lm))
    title = "step 10: a prompt's KV blocks handed from the prefill engine to the decode engine"
    draw_handover.draw_handover(seen, title, out / "handover.png")
    return seen


def handover_engines(
    lm: LoadedModel, config: dict | None = None
) -> tuple[DisaggEngine, DisaggEngine]:
    """A prefill and a decode engine with pools of POOL_BLOCKS, the decode one fetching from
    the prefill one in this process (step 10's `local_engines`)."""
    return local_engines(lm, **{"num_kv_blocks": POOL_BLOCKS, **(config or {})})


def code_pictures(out: Path) -> None:
    miss, hit = topology.request_path(hit=False), topology.request_path(hit=True)
    draw_topology.draw_request_path(miss, hit, topology.steps_using_pipeline(),
                                    out / "request-path.png")  # fmt: skip
    draw_topology.draw_topology(topology.topology(), out / "topology.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.pictures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("groups", nargs="*", metavar="GROUP",
                   help=f"which pictures: {', '.join(GROUPS)} (default: all)")  # fmt: skip
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the PNG files")
    p.add_argument("--only-code", action="store_true", help="the same as the group `code`")
    args = p.parse_args(argv)
    if unknown := set(args.groups) - set(GROUPS):
        p.error(f"no such group: {', '.join(sorted(unknown))} (one of {', '.join(GROUPS)})")
    groups = set(args.groups or (["code"] if args.only_code else GROUPS))
    if "code" in groups:
        code_pictures(args.out)
    if groups - {"code"}:
        lm = load_model(ServerConfig(dtype="float32"))
        if "engines" in groups:
            engine_pictures(lm, args.out)
        if "handover" in groups:
            handover_picture(lm, args.out)
    print(f"pictures in {args.out}")


if __name__ == "__main__":
    main()
