"""bench.pictures: the pictures are drawn from a real engine's state and show what it holds.

The engines run on the tiny random-weight model with the bench's prompts (the same token counts
as the real model's, so the same block arithmetic); each test compares what was drawn (cells
found by their gid) with the engine's own state at the moment drawn.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from transformers import AutoConfig

from bench.pictures import capture, draw, draw_handover, draw_topology, handover, topology
from bench.pictures.__main__ import (
    POOL_BLOCKS,
    TIGHT_BLOCKS,
    around_preemption,
    handover_engines,
    pick_verifications,
    richest,
)
from common.config import ServerConfig
from common.model import load_model
from step7_real_kv.engine import EngineConfig, PagedEngine
from step8_speculative.engine import SpeculativeConfig, SpeculativeEngine
from step10_disaggregated.leases import handed_over


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def gids(fig, prefix: str) -> list[str]:
    found = [a.get_gid() for ax in fig.axes for a in ax.patches]
    return [g for g in found if g and g.startswith(prefix)]


@pytest.fixture(scope="module")
def pool(tiny_lm):
    engine = PagedEngine(tiny_lm, EngineConfig(num_kv_blocks=POOL_BLOCKS))
    scene = asyncio.run(capture.pool_scene(engine, tiny_lm))
    return engine, scene.pools["decoding"]


@pytest.fixture(scope="module")
def batch(tiny_lm):
    engine = SpeculativeEngine(tiny_lm, SpeculativeConfig(num_kv_blocks=256))
    return engine, asyncio.run(capture.batch_scene(engine, tiny_lm))


def test_the_pool_drawn_is_the_engines_pool(pool, tmp_path):
    engine, view = pool
    fig = draw.draw_pool(view, "pool", tmp_path / "pool.png")
    assert (tmp_path / "pool.png").stat().st_size > 0
    assert sorted(gids(fig, "block-")) == sorted(f"block-{b}" for b in range(POOL_BLOCKS))
    assert view.ref_counts == engine.blocks.ref_counts  # the moment drawn is the engine's now
    running = {s.request.trace_id: s.block_table for s in engine.scheduler.running}
    assert view.tables == running and len(running) == 4
    states = Counter(view.state(b) for b in range(POOL_BLOCKS))
    assert states["cached"] >= 1  # the finished chat's block, free but findable
    assert states["free"] + states["cached"] == engine.blocks.num_free


def test_the_shared_system_prompt_is_drawn_once_with_its_reference_counts(pool):
    _, view = pool
    shared = view.shared_prefix()
    holders = [t for t in view.tables.values() if t[: len(shared)] == shared]
    assert len(shared) >= 16 and len(holders) == 3  # ~270 shared tokens, three chats
    assert all(view.ref_counts[b] == 3 and view.state(b) == "shared" for b in shared)
    fig = draw.draw_pool(view, "pool")
    drawn = Counter(g.split("-")[-1] for g in gids(fig, "table-"))
    assert all(drawn[str(b)] == 1 for b in shared)  # once, not once per table
    own = [b for t in view.tables.values() for b in t if b not in shared]
    assert sum(drawn.values()) == len(shared) + len(own)


def test_the_iteration_drawn_is_one_forward_pass_under_the_budget(batch):
    _, scene = batch
    mixed = richest(scene.iterations)
    kinds = {s.kind for s in mixed.steps}
    assert "prefill" in kinds and kinds & {"decode", "verify"}  # a chunk beside decoders
    fig = draw.draw_iteration(mixed, "iteration")
    rows = gids(fig, "row-")
    assert len(rows) == sum(s.tokens for s in mixed.steps) <= mixed.budget
    assert len(gids(fig, "slot-")) == mixed.budget - len(rows)
    for step in mixed.steps:  # each sequence's rows are its step's tokens, drafts included
        assert sum(1 for g in rows if g.startswith(f"row-{step.request_id}-")) == step.tokens


def test_the_verifications_drawn_are_the_engines(batch, tiny_lm):
    _, scene = batch
    assert scene.verifications, "the tiny model's repetitions give the lookup drafts"
    on_timeline = Counter(
        (s.request_id, s.proposed, s.accepted)
        for it in scene.iterations
        for s in it.steps
        if s.kind == "verify"
    )
    captured = Counter((v.request, len(v.draft), v.accepted) for v in scene.verifications)
    assert captured <= on_timeline  # (a verification ending its request is left out)
    for v in scene.verifications:  # greedy: the kept run is the draft's agreeing prefix + 1
        assert v.kept[: v.accepted] == v.draft[: v.accepted]
        assert v.accepted == len(v.draft) or v.kept[v.accepted] != v.draft[v.accepted]
    chosen = pick_verifications(scene.verifications)
    fig = draw.draw_verifications(chosen, tiny_lm.tokenizer.decode, "verification")
    assert len(gids(fig, "draft-")) == sum(len(v.draft) for v in chosen)
    assert len(gids(fig, "chose-")) == sum(v.accepted + 1 for v in chosen)


def test_a_rejected_draft_rolls_back_only_blocks_past_the_kept_tokens():
    v = capture.Verification("r", [], [1, 2, 3, 4, 5], [1, 9], 14, [7, 8, 9], block_size=8)
    # slots 14..19 written; 14 (the real token) and 15 (the kept draft token) stay
    assert (v.written, v.computed_after) == (20, 16)
    assert v.rolled_back_blocks() == [9]
    whole = capture.Verification("r", [], [1, 2], [1, 2, 3], 14, [7, 8, 9], block_size=8)
    assert whole.rolled_back_blocks() == []


def test_the_preemption_drawn_is_the_engines(tiny_lm):
    engine = PagedEngine(tiny_lm, EngineConfig(num_kv_blocks=TIGHT_BLOCKS))
    scene = asyncio.run(capture.preempt_scene(engine, tiny_lm))
    window = around_preemption(scene.iterations)
    preempted = [it for it in window if it.preempted]
    assert preempted and preempted[0].preempted == ["short-capital"]  # the youngest goes
    assert engine.scheduler.num_preemptions == sum(len(it.preempted) for it in scene.iterations)
    assert max(it.kv_used for it in window) == TIGHT_BLOCKS  # the pool ran short
    fig = draw.draw_preemption(window, "preemption")
    assert len(gids(fig, "bar-")) == sum(len(it.steps) for it in window)


def test_the_request_path_is_step_6s_pipeline_as_it_runs():
    assert topology.request_path(hit=False) == [
        "validate", "response cache", "admission", "engine", "stream",
    ]  # fmt: skip
    assert topology.request_path(hit=True) == ["validate", "response cache", "stream"]
    steps = topology.steps_using_pipeline()
    assert {"step6_backpressure", "step7_real_kv", "step8_speculative"} <= set(steps)
    fig = draw_topology.draw_request_path(
        topology.request_path(False), topology.request_path(True), steps
    )
    assert len(gids(fig, "stage-")) == 5


def test_step9s_topology_is_read_from_its_manifests():
    top = topology.topology()
    edges = set(top.edges)
    assert ("client", "Service/router", "calls") in edges
    assert ("Deployment/router", "Service/engines", "calls") in edges
    assert ("Deployment/router", "Service/redis", "calls") in edges
    assert ("Service/engines", "Deployment/engines", "selects") in edges
    assert ("Deployment/prometheus", "Deployment/engines", "scrapes") in edges
    assert ("HorizontalPodAutoscaler/engines", "Deployment/engines", "scales") in edges
    fig = draw_topology.draw_topology(top)
    kinds = top.kinds()
    boxes = len(kinds["Deployment"]) + len(kinds["HorizontalPodAutoscaler"])
    assert len(gids(fig, "box-")) == boxes + len(kinds["APIService"]) + 1  # + the client


# ---------------------------------------------------------------- step 10's hand-over


def kv_bytes_per_token(config) -> int:
    """K and V of one token slot in every layer, float32: layers x kv heads x head dim x 4 x 2."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * config.num_key_value_heads * head_dim * 4 * 2


@pytest.fixture(scope="module")
def handed(tiny_lm):
    prefill, decode_engine = handover_engines(tiny_lm)
    return (
        prefill,
        decode_engine,
        asyncio.run(handover.handover_scene(prefill, decode_engine, tiny_lm)),
    )


def prompt_names(lm, prompt_id: str) -> list[bytes]:
    """The names of the chat's handed-over blocks: of all its tokens but the last, the full
    blocks' chained hashes, then the partial block's."""
    (prompt,) = capture.prompts(prompt_id)
    return handed_over(capture.chat_request(lm, prompt, 1).prompt_ids, 16)[0]


def test_the_handover_drawn_is_the_engines_own(handed, tiny_lm):
    prefill, decode_engine, h = handed
    first, second = prompt_names(tiny_lm, handover.FIRST), prompt_names(tiny_lm, handover.SECOND)
    common = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    # 334 of its 335 tokens: 20 full blocks and a partial one of 14 tokens
    assert h.request == handover.SECOND and len(h.leased) == len(second) == 21
    assert h.partial == 14 and h.computed_on_decode == 1
    # the decode engine kept what the first chat left in its prefix cache, and took in the rest
    assert len(h.kept) == common == 16 and len(h.taken_in) == len(h.leased) - len(h.kept)
    *full, partial = h.kept + h.taken_in
    assert decode_engine.blocks.lookup(second) == full  # named in its cache, all but the last
    assert not set(h.kept) & set(h.taken_in)
    assert h.moved_tokens == 4 * 16 + 14
    # at the moment drawn: the prefill blocks held by the lease alone, the decode blocks its
    # own, the full ones named (a partial block never is)
    assert all(h.prefill.ref_counts[b] == 1 for b in h.leased)
    assert all(h.decode.ref_counts[b] == 1 and h.decode.findable[b] for b in full)
    assert h.decode.ref_counts[partial] == 1 and not h.decode.findable[partial]
    assert h.release == "confirmed" and 0 < h.lease_left_s <= h.lease_s
    # what moved: the engines' own counters (the first chat moved all of its blocks)
    sent = prefill.leases.stats
    assert sent.blocks_sent == decode_engine.leases.stats.blocks_received
    assert sent.blocks_sent == len(first) + len(h.taken_in)
    assert h.bytes_per_token == kv_bytes_per_token(tiny_lm.config)
    assert h.moved_bytes == len(h.taken_in) * 16 * h.bytes_per_token
    # then the lease ended and every block came back
    assert not prefill.leases.held and sent.ended == {"confirmed": 2}
    assert set(prefill.blocks.ref_counts) == set(decode_engine.blocks.ref_counts) == {0}


def test_the_handover_picture_draws_each_block_and_each_move(handed, tmp_path):
    _, _, h = handed
    fig = draw_handover.draw_handover(h, "handover", tmp_path / "handover.png")
    assert (tmp_path / "handover.png").stat().st_size > 0
    assert len(gids(fig, "prefill-block-")) == len(gids(fig, "decode-block-")) == POOL_BLOCKS
    assert len(gids(fig, "moved-")) == len(h.taken_in)
    assert sorted(gids(fig, "decode-prompt-")) == sorted(
        f"decode-prompt-{b}" for b in h.kept + h.taken_in
    )


def test_the_real_model_moves_46080_bytes_per_prompt_token(real_model_dir):
    assert kv_bytes_per_token(AutoConfig.from_pretrained(real_model_dir)) == 46_080
