"""Run step 7's and step 8's engines in-process and take what the pictures show from their state.

Everything here reads the engine through what it exposes: the block manager's reference counts
and names, the scheduler's queues and the sequences' block tables, the timeline's record of
each iteration, and the requests' tokens. The one thing no attribute keeps is a draft: it lives
between the proposer and the forward pass. So, as bench/step7_profile.py times the runner by
wrapping its `forward` from outside, `watch_drafts` wraps it to note the drafts it is handed;
the shipped engine carries no hook for pictures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from bench.workload import Prompt, load_workload
from common.model import LoadedModel
from common.request import Request
from common.sampling import SamplingParams
from common.timeline import Iteration
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.engine import PagedEngine
from step8_speculative.engine import SpeculativeEngine
from step8_speculative.sequence import DraftSequence


@dataclass(frozen=True)
class PoolView:
    """The KV pool at one moment: each block's reference count and whether the prefix cache
    can still find it, and some sequences' block tables (block ids in token order)."""

    block_size: int
    ref_counts: list[int]
    findable: list[bool]  # named, and the block `lookup` finds for that name
    tables: dict[str, list[int]]  # sequence -> its block table
    computed: dict[str, int]  # sequence -> tokens whose K/V are in the pool

    def state(self, block: int) -> str:
        """free | cached (free, still findable by its prefix) | in use | shared."""
        refs = self.ref_counts[block]
        if refs == 0:
            return "cached" if self.findable[block] else "free"
        return "shared" if refs > 1 else "in use"

    def shared_prefix(self) -> list[int]:
        """The longest run of leading blocks that several tables hold (the system prompt's)."""
        firsts = [t[0] for t in self.tables.values() if t]
        if not firsts:
            return []
        most = max(set(firsts), key=firsts.count)
        tables = [t for t in self.tables.values() if t and t[0] == most]
        if len(tables) < 2:
            return []
        prefix: list[int] = []
        for blocks in zip(*tables, strict=False):
            if len(set(blocks)) != 1:
                break
            prefix.append(blocks[0])
        return prefix


@dataclass(frozen=True)
class Verification:
    """One drafted sequence's verification: what was proposed, what the model kept, and where
    the K/V slots of the step went in its block table."""

    request: str
    context: list[int]  # the last tokens before the draft
    draft: list[int]
    kept: list[int]  # the accepted prefix of the draft, then the model's own token
    computed_before: int  # tokens in the pool when the forward pass ran
    block_table: list[int]
    block_size: int

    @property
    def accepted(self) -> int:
        return len(self.kept) - 1

    @property
    def written(self) -> int:
        """Slots the forward pass wrote: the last real token and every draft token."""
        return self.computed_before + 1 + len(self.draft)

    @property
    def computed_after(self) -> int:
        return self.computed_before + 1 + self.accepted

    def rolled_back_blocks(self) -> list[int]:
        """Blocks holding only rejected slots: kept in the table, written over next time."""
        first = -(-self.computed_after // self.block_size)
        last = -(-self.written // self.block_size)
        return self.block_table[first:last]


@dataclass
class Scene:
    """What one engine run saw: the iterations in the order they ran, pool views and
    verifications at chosen moments, and the requests' names for the legends."""

    iterations: list[Iteration] = field(default_factory=list)
    pools: dict[str, PoolView] = field(default_factory=dict)
    verifications: list[Verification] = field(default_factory=list)


def chat_request(lm: LoadedModel, prompt: Prompt, max_tokens: int) -> Request:
    """The bench's chat prompt, greedy, EOS ignored so that it runs its max_tokens."""
    ids = lm.tokenizer.apply_chat_template(
        load_workload().messages(prompt), add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )  # fmt: skip
    prompt_ids = cast(list[int], ids)
    params = SamplingParams(temperature=0.0)
    return Request(
        prompt_ids, params, max_tokens, lm.tokenizer, eos_token_ids=set(), request_id=prompt.id
    )


def prompts(*ids: str) -> list[Prompt]:
    by_id = {p.id: p for p in load_workload().prompts}
    return [by_id[i] for i in ids]


def pool_view(engine: PagedEngine) -> PoolView:
    """The pool now, with the block table of every running sequence."""
    running = engine.scheduler.running
    return pool_of(
        engine.blocks,
        {s.request.trace_id: list(s.block_table) for s in running},
        {s.request.trace_id: s.num_computed for s in running},
    )


def pool_of(
    blocks: BlockManager, tables: dict[str, list[int]], computed: dict[str, int]
) -> PoolView:
    """The block manager's reference counts and names now, beside the given block tables."""
    findable = [
        name is not None and blocks.by_hash.get(name) == b
        for b, name in enumerate(blocks.block_hash)
    ]
    return PoolView(blocks.block_size, list(blocks.ref_counts), findable, tables, computed)


async def step(engine: PagedEngine, scene: Scene) -> Iteration | None:
    """One iteration; its record from the engine's timeline (None if nothing ran)."""
    timeline = engine.timeline
    assert timeline is not None, "the pictures read the timeline: keep it on"
    before = timeline.iterations[-1] if timeline.iterations else None
    await engine.step()
    iteration = timeline.iterations[-1] if timeline.iterations else None
    if iteration is None or iteration is before:
        return None
    scene.iterations.append(iteration)
    return iteration


async def run_until(
    engine: PagedEngine, scene: Scene, done: Callable[[], bool], most: int = 400
) -> None:
    for _ in range(most):
        if done():
            return
        await step(engine, scene)
    raise RuntimeError(f"the engine did not reach the moment in {most} iterations")


def decoding(engine: PagedEngine) -> bool:
    """Every admitted sequence has its prompt in the pool and nobody waits."""
    s = engine.scheduler
    return not s.waiting and all(q.num_computed >= q.request.num_prompt_tokens for q in s.running)


class watch_drafts:
    """Wraps the runner's forward pass to note each drafted sequence as the pass sees it; after
    the iteration, `settle` pairs each with the tokens the model kept."""

    def __init__(self, engine: SpeculativeEngine, context: int = 6) -> None:
        self.engine, self.context = engine, context
        self.pending: list[tuple[DraftSequence, list[int], int, list[int], int]] = []
        forward = engine.runner.forward

        def noting(batch: Any) -> Any:
            for seq in cast(list[DraftSequence], engine.scheduler.running):
                if seq.draft:
                    outputs = seq.request.num_output_tokens
                    self.pending.append(
                        (seq, list(seq.draft), seq.num_computed, list(seq.block_table), outputs)
                    )
            return forward(batch)

        engine.runner.forward = noting  # type: ignore[method-assign]

    def settle(self, scene: Scene) -> None:
        size = self.engine.blocks.block_size
        for seq, draft, computed, table, outputs in self.pending:
            request = seq.request
            if request.finished:  # a stop may have cut the kept run short
                continue
            before = request.num_prompt_tokens + outputs
            context = request.token_ids[max(0, before - self.context) : before]
            kept = request.output_ids[outputs:]
            scene.verifications.append(
                Verification(request.trace_id, context, draft, kept, computed, table, size)
            )
        self.pending = []


# ---------------------------------------------------------------- the moments drawn


async def submit(engine: PagedEngine, lm: LoadedModel, ids: list[str], max_tokens: int) -> None:
    for prompt in prompts(*ids):
        await engine.submit(chat_request(lm, prompt, max_tokens))


async def pool_scene(engine: PagedEngine, lm: LoadedModel) -> Scene:
    """Three chats with the shared system prompt and one without, decoding; one short chat
    already finished, its blocks free but still findable by their prefix."""
    scene = Scene()
    await submit(engine, lm, ["short-haiku"], max_tokens=2)
    await run_until(engine, scene, lambda: not engine.scheduler.has_work)
    await submit(engine, lm, ["shared-hours", "shared-fees", "shared-renew", "short-capital"], 32)
    await run_until(engine, scene, lambda: decoding(engine))
    for _ in range(3):
        await step(engine, scene)
    scene.pools["decoding"] = pool_view(engine)
    return scene


async def batch_scene(engine: SpeculativeEngine, lm: LoadedModel) -> Scene:
    """Step 8: three chats decoding (with drafts where the lookup finds one), then a long
    prompt arrives and is prefilled in a chunk beside them, under the same token budget."""
    scene = Scene()
    drafts = watch_drafts(engine)

    async def one() -> None:
        await step(engine, scene)
        drafts.settle(scene)

    await submit(engine, lm, ["shared-hours", "shared-fees", "shared-renew"], max_tokens=48)
    while not decoding(engine):
        await one()
    for _ in range(4):
        await one()
    await submit(engine, lm, ["long-summary"], max_tokens=8)
    for _ in range(12):
        await one()
    return scene


async def preempt_scene(engine: PagedEngine, lm: LoadedModel) -> Scene:
    """Step 7 with a pool too small for three growing sequences: the youngest is preempted,
    waits, and comes back (its prompt found again in the prefix cache)."""
    scene = Scene()
    await submit(engine, lm, ["long-summary", "medium-explain", "short-capital"], max_tokens=24)
    await run_until(engine, scene, lambda: engine.scheduler.num_preemptions > 0)
    await run_until(engine, scene, lambda: not engine.scheduler.has_work)
    return scene
