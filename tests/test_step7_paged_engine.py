"""Step 7's engine: paged attention equals dense attention, and greedy tokens equal plain
transformers `generate` in float32 however the scheduler slices the work: mixed batches, block
boundaries, prefix-cache hits, chunked prefill, preemption and recomputation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from common.config import ServerConfig
from common.errors import APIError
from common.model import load_model
from common.request import RequestStatus
from step7_real_kv.attention import decode_attention, prefill_attention
from step7_real_kv.engine import EngineConfig, PagedEngine
from step7_real_kv.paged_kv import PagedKVCache, slot_numbers
from tests.conftest import tiny_client
from tests.engine_helpers import drain, make_request

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog",
    "One two three four five six seven eight nine ten eleven twelve thirteen",
    "A",
]


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def reference(lm, prompt: str | list[int], max_tokens: int) -> list[int]:
    """transformers' greedy answer. `prompt`: text or ids."""
    if isinstance(prompt, str):
        prompt = lm.tokenizer.encode(prompt, add_special_tokens=False)
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=0)
    return out[0, ids.shape[1] :].tolist()


def run_engine(lm, prompts, max_tokens, engine=None, **engine_args):
    """Submit every prompt at once and step the engine until all are done, on this thread."""

    async def go():
        nonlocal engine
        engine = engine or PagedEngine(lm, EngineConfig(**engine_args))
        requests = [make_request(lm, p, max_tokens) for p in prompts]
        for request in requests:
            engine.scheduler.add(request)
        while engine.scheduler.has_work:
            await engine.step()
        texts = [await drain(r) for r in requests]
        return [r.output_ids for r in requests], texts

    outputs, texts = asyncio.run(go())
    return outputs, texts, engine


def assert_pool_empty(engine: PagedEngine) -> None:
    blocks = engine.blocks
    assert blocks.num_free == blocks.num_blocks
    assert set(blocks.ref_counts) == {0}


# ---------------------------------------------------------------- attention over blocks


def dense_attention(q, k, v, cached: int) -> torch.Tensor:
    """q [n, heads, d], k/v [context, kv_heads, d]: repeat kv heads, causal after `cached`."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    scores = q.transpose(0, 1) @ k.transpose(1, 2) / q.shape[-1] ** 0.5  # [heads, n, context]
    n, context = q.shape[0], k.shape[1]
    allowed = torch.ones(n, context, dtype=torch.bool).tril(cached)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1)


@pytest.mark.parametrize("cached, n", [(0, 5), (7, 3), (8, 1), (3, 9)])
def test_paged_attention_equals_dense(cached, n):
    torch.manual_seed(cached * 10 + n)
    pool = PagedKVCache(1, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    table = [5, 2, 7, 0]  # scattered, out of order
    k, v = torch.randn(cached + n, 2, 8), torch.randn(cached + n, 2, 8)
    slots = torch.tensor(slot_numbers(table, 0, cached + n, 4))
    pool.write(0, slots, k, v)
    q = torch.randn(n, 6, 8)
    paged_k, paged_v = pool.gather(0, slots)
    expected = dense_attention(q, k, v, cached)
    torch.testing.assert_close(prefill_attention(q, paged_k, paged_v), expected)
    if n == 1:  # one query: the batched decode path, padded to a longer context
        pad = torch.cat([slots, torch.zeros(3, dtype=torch.long)])[None]
        mask = (torch.arange(pad.shape[1]) < cached + n)[None]
        pk, pv = pool.gather(0, pad)
        torch.testing.assert_close(decode_attention(q, pk, pv, mask)[0], expected[0])


@pytest.mark.parametrize("cached, n", [(0, 300), (700, 300), (37, 600)])
def test_a_long_prefill_chunk_attends_as_dense_attention_does(cached, n):
    """The model's shapes (9 query heads on 3 kv heads, 64 dims) at lengths where SDPA's flash
    kernel works in blocks of keys: without a cached prefix the causal form, after one the
    mask, each equal to the dense reference."""
    torch.manual_seed(cached + n)
    block_size, context = 16, cached + n
    pool = PagedKVCache(1, num_blocks=80, block_size=block_size, num_kv_heads=3, head_dim=64)
    table = torch.randperm(80)[: -(-context // block_size)].tolist()  # scattered blocks
    k, v = torch.randn(context, 3, 64), torch.randn(context, 3, 64)
    slots = torch.tensor(slot_numbers(table, 0, context, block_size))
    pool.write(0, slots, k, v)
    q = torch.randn(n, 9, 64)
    paged_k, paged_v = pool.gather(0, slots)
    expected = dense_attention(q, k, v, cached)
    torch.testing.assert_close(prefill_attention(q, paged_k, paged_v), expected)


# ---------------------------------------------------------------- exactness on the tiny model


def test_single_prompts_match_generate(tiny_lm):
    for prompt in PROMPTS:
        outputs, _, engine = run_engine(tiny_lm, [prompt], 10, block_size=4, num_kv_blocks=64)
        assert outputs[0] == reference(tiny_lm, prompt, 10)
        assert_pool_empty(engine)


def test_mixed_batch_matches_each_alone(tiny_lm):
    outputs, texts, engine = run_engine(tiny_lm, PROMPTS, 12, block_size=4, num_kv_blocks=64)
    assert outputs == [reference(tiny_lm, p, 12) for p in PROMPTS]
    assert texts == [tiny_lm.tokenizer.decode(o) for o in outputs]
    assert_pool_empty(engine)


@pytest.mark.parametrize("length", [3, 4, 5, 8, 9])
def test_prompts_ending_at_and_across_block_boundaries(tiny_lm, length):
    ids = list(range(1000, 1000 + length))
    prompt = tiny_lm.tokenizer.decode(ids)
    assert len(tiny_lm.tokenizer.encode(prompt, add_special_tokens=False)) >= 1
    outputs, _, engine = run_engine(tiny_lm, [prompt], 9, block_size=4, num_kv_blocks=32)
    assert outputs[0] == reference(tiny_lm, prompt, 9)


def test_prefix_cache_hit_reuses_blocks_and_keeps_tokens(tiny_lm):
    shared = PROMPTS[2]
    _, _, engine = run_engine(tiny_lm, [shared], 4, block_size=4, num_kv_blocks=64)
    longer = shared + " fourteen fifteen"
    outputs, _, engine = run_engine(tiny_lm, [longer, shared], 8, engine=engine)
    assert engine.blocks.stats.hit_tokens >= 8  # at least two full blocks were found
    assert outputs == [reference(tiny_lm, longer, 8), reference(tiny_lm, shared, 8)]
    assert_pool_empty(engine)


def test_chunked_prefill_mixed_with_decodes(tiny_lm):
    outputs, _, engine = run_engine(
        tiny_lm,
        PROMPTS,
        12,
        block_size=4,
        num_kv_blocks=64,
        max_num_batched_tokens=5,
        max_num_seqs=4,
    )
    assert outputs == [reference(tiny_lm, p, 12) for p in PROMPTS]


def test_preempted_sequences_resume_without_repeating_tokens(tiny_lm):
    # 12 blocks of 4 = 48 slots for four sequences that grow to ~90 tokens together.
    outputs, texts, engine = run_engine(
        tiny_lm,
        PROMPTS,
        14,
        block_size=4,
        num_kv_blocks=12,
        max_num_batched_tokens=16,
        max_num_seqs=4,
    )
    assert engine.scheduler.num_preemptions > 0
    assert outputs == [reference(tiny_lm, p, 14) for p in PROMPTS]
    assert texts == [tiny_lm.tokenizer.decode(o) for o in outputs]  # nothing streamed twice
    assert_pool_empty(engine)


def test_filling_the_pool_and_draining_it_frees_every_block(tiny_lm):
    prompts = [f"request number {i} says hello" for i in range(10)]
    _, _, engine = run_engine(tiny_lm, prompts, 20, block_size=4, num_kv_blocks=24)
    assert engine.scheduler.num_preemptions > 0
    assert_pool_empty(engine)
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_cancelled_sequence_frees_its_blocks_at_once(tiny_lm):
    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=40))
        keep, drop = make_request(tiny_lm, "keep me", 40), make_request(tiny_lm, "drop me", 100)
        engine.scheduler.add(keep)
        engine.scheduler.add(drop)
        await engine.step()
        await engine.step()
        drop.cancel()
        at_cancel = drop.num_output_tokens
        await engine.step()
        assert [s.request for s in engine.scheduler.running] == [keep]
        while engine.scheduler.has_work:
            await engine.step()
        return engine, drop, at_cancel

    engine, drop, at_cancel = asyncio.run(go())
    assert drop.num_output_tokens == at_cancel  # not one token more after the cancel
    assert_pool_empty(engine)


def test_bfloat16_runs_the_same_code_path(tiny_model_dir):
    """bfloat16 runs the paged engine's own forward pass over a bfloat16 pool (the torch code:
    the C++ kernels are float32 only), and greedy tokens equal transformers' in bfloat16."""
    lm = load_model(ServerConfig(model=str(tiny_model_dir), dtype="bfloat16"))
    outputs, _, engine = run_engine(lm, PROMPTS, 6, block_size=4, num_kv_blocks=64)
    assert engine.kv.k.dtype == torch.bfloat16
    assert engine.runner.backends["kernels"] == "torch"
    assert outputs == [reference(lm, p, 6) for p in PROMPTS]
    assert_pool_empty(engine)


def test_a_fault_while_sampling_fails_that_iteration_not_the_engine(tiny_lm):
    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=32))
        broken = make_request(tiny_lm, PROMPTS[1], 5)
        broken.sampler.took = lambda *_: 1 / 0  # greedy: the argmax is taken, then `took`
        engine.scheduler.add(broken)
        await engine.step()  # used to escape the worker thread and end the engine's loop
        with pytest.raises(ZeroDivisionError):  # the client gets the error
            await drain(broken)
        assert_pool_empty(engine)
        healthy = make_request(tiny_lm, PROMPTS[1], 5)
        engine.scheduler.add(healthy)
        while engine.scheduler.has_work:
            await engine.step()
        return healthy.output_ids

    assert asyncio.run(go()) == reference(tiny_lm, PROMPTS[1], 5)


def test_request_larger_than_the_pool_is_refused(tiny_lm):
    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=4))
        prompt_tokens = len(tiny_lm.tokenizer.encode("hello", add_special_tokens=False))
        with pytest.raises(APIError, match="KV pool"):
            engine.require_fit(make_request(tiny_lm, "hello", 20))
        with pytest.raises(APIError, match="KV pool"):  # 17 slots: one over the pool's 16
            engine.require_fit(make_request(tiny_lm, "hello", 17 - prompt_tokens))
        engine.require_fit(make_request(tiny_lm, "hello", 8))  # 9 tokens: 3 blocks fit
        engine.require_fit(make_request(tiny_lm, "hello", 16 - prompt_tokens))  # exactly full

    asyncio.run(go())


def test_server_answers_over_http(tiny_model_dir):
    with tiny_client("step7_real_kv", tiny_model_dir, num_kv_blocks=64) as client:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 5}
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 5


# ---------------------------------------------------------------- the real model


@pytest.mark.integration
def test_real_model_greedy_matches_generate_under_pressure(real_model_dir):
    lm = load_model(ServerConfig(model=str(real_model_dir)))
    prompts = ["The capital of France is", "Water boils at", "The capital of France is not"]
    expected = [reference(lm, p, 10) for p in prompts]
    outputs, _, engine = run_engine(lm, prompts, 10, block_size=4, num_kv_blocks=9)
    assert outputs == expected
    assert engine.scheduler.num_preemptions > 0 and engine.blocks.stats.hit_tokens > 0
    assert_pool_empty(engine)


def test_a_preempted_sequence_waits_again_and_admission_counts_it(tiny_lm):
    from step6_backpressure.admission import AdmissionConfig
    from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig
    from step7_real_kv.kv_admission import KVAdmission

    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=12))
        lifecycle = Lifecycle(LifecycleConfig())
        admission = KVAdmission(AdmissionConfig(), engine, lifecycle)
        requests = [make_request(tiny_lm, p, 14) for p in PROMPTS]
        for request in requests:
            await engine.submit(request)
        while engine.scheduler.num_preemptions == 0:
            await engine.step()
        victim = engine.scheduler.waiting[0]
        newcomer = make_request(tiny_lm, "x", 1)
        counted, _ = admission.engine.kv_demand(newcomer)
        return victim, counted, newcomer

    victim, counted, newcomer = asyncio.run(go())
    assert victim.request.status is RequestStatus.WAITING
    assert victim.request.num_output_tokens > 0  # it had started: its tokens are kept
    assert victim.block_table == [] and victim.num_computed == 0
    blocks_for = lambda n: -(-n // 4)  # noqa: E731
    assert counted >= blocks_for(victim.num_tokens) + blocks_for(newcomer.num_prompt_tokens)


def test_a_fault_in_one_sequence_fails_that_sequence_alone(tiny_lm):
    """Sampling and detokenizing are per sequence: healthy neighbours in the same iterations
    finish exactly as they would alone, the faulty ones get their error, every block returns."""

    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=64))
        healthy = [make_request(tiny_lm, p, 8) for p in (PROMPTS[0], PROMPTS[2])]
        bad_sampler = make_request(tiny_lm, PROMPTS[1], 8)
        bad_sampler.sampler.took = lambda *_: 1 / 0
        bad_text = make_request(tiny_lm, PROMPTS[3], 8)
        bad_text._detok.push = lambda token: [][token]  # IndexError while detokenizing
        for request in (healthy[0], bad_sampler, bad_text, healthy[1]):
            await engine.submit(request)
        sizes = []
        engine.batch_size_hooks.append(sizes.append)
        while engine.scheduler.has_work:
            await engine.step()
        for broken, error in ((bad_sampler, ZeroDivisionError), (bad_text, IndexError)):
            with pytest.raises(error):
                await drain(broken)
        texts = [await drain(r) for r in healthy]
        return [r.output_ids for r in healthy], texts, sizes[0], engine

    outputs, texts, first_batch, engine = asyncio.run(go())
    assert first_batch == 4  # all four shared the first iteration
    assert outputs == [reference(tiny_lm, p, 8) for p in (PROMPTS[0], PROMPTS[2])]
    assert texts == [tiny_lm.tokenizer.decode(o) for o in outputs]
    assert_pool_empty(engine)


# ---------------------------------------------------------------- with and without the C++ kernels
# (the kernels themselves: tests/test_step7_kernels.py)


@pytest.mark.parametrize("backends", [("torch", "torch"), ("auto", "torch"), ("torch", "cpp")])
def test_each_backend_alone_is_exact_too(tiny_lm, backends, request):
    """The default path (oneDNN matmuls, the C++ kernels) is exact on the tests above; so is
    each piece alone, and the plain torch code. The kernels' case runs them or fails (it
    asks for them as required), never the torch code in their place."""
    linear, kernels = backends
    if kernels == "cpp":
        request.getfixturevalue("kernels")  # skipped where they cannot load, failed in CI
    outputs, _, engine = run_engine(
        tiny_lm, PROMPTS, 10, block_size=4, num_kv_blocks=64,
        linear_backend=linear, kernels=kernels,
    )  # fmt: skip
    assert engine.runner.backends["kernels"] == kernels
    assert engine.runner.backends["linear"].startswith("onednn" if linear == "auto" else "torch")
    assert outputs == [reference(tiny_lm, p, 10) for p in PROMPTS]


# ---------------------------------------------------------------- a long prompt, the real model


@pytest.fixture(scope="module")
def real_lm(real_model_dir):
    return load_model(ServerConfig(model=str(real_model_dir), dtype="float32"))


@pytest.mark.parametrize("budget", [256, 2048])
def test_a_long_prompt_on_the_real_model_matches_generate(real_lm, budget):
    """About 1,200 tokens of prose, prefilled in 256-token chunks (each after a cached
    prefix: the masked form) or in one (the causal form), with the server's default speed
    layer: the greedy tokens are transformers'."""
    text = (Path(__file__).parent.parent / "step7_real_kv" / "README.md").read_text()
    prompt = real_lm.tokenizer.encode(text, add_special_tokens=False)[:1200]
    outputs, _, _ = run_engine(real_lm, [prompt], 8, max_num_batched_tokens=budget)
    assert outputs[0] == reference(real_lm, prompt, 8)


# ---------------------------------------------------------------- the prefill-only budget


def recorded_schedule(engine: PagedEngine) -> list[list[int]]:
    """From now on, the new tokens of every sequence, iteration by iteration, as the engine's
    scheduler gives them (the list fills as the engine steps)."""
    iterations: list[list[int]] = []
    schedule = engine.scheduler.schedule

    def recorded():
        work = schedule()
        iterations.append([n for _, n in work])
        return work

    engine.scheduler.schedule = recorded  # type: ignore[method-assign]
    return iterations


def chunks_of(lm, prompts: list[list[int]], max_tokens: int, **engine_args) -> list[list[int]]:
    """The new tokens of every sequence, iteration by iteration, as the scheduler gave them."""
    engine = PagedEngine(lm, EngineConfig(block_size=4, num_kv_blocks=256, **engine_args))
    iterations = recorded_schedule(engine)
    run_engine(lm, prompts, max_tokens, engine=engine)
    return iterations


def test_a_lone_long_prompt_takes_the_prefill_budget_in_one_chunk(tiny_lm):
    prompt = list(range(1000, 1300))  # 300 tokens
    assert chunks_of(tiny_lm, [prompt], 2, max_num_batched_tokens=64)[:5] == [[64]] * 4 + [[44]]
    assert chunks_of(tiny_lm, [prompt], 2, max_num_batched_tokens=64, max_prefill_tokens=512)[
        :2
    ] == [[300], [1]]


def test_the_prefill_budget_waits_while_a_stream_has_begun(tiny_lm):
    """A second long prompt arriving while the first decodes gets max_num_batched_tokens."""
    short, long = list(range(1000, 1010)), list(range(2000, 2300))

    async def go():
        engine = PagedEngine(
            tiny_lm,
            EngineConfig(
                block_size=4, num_kv_blocks=256, max_num_batched_tokens=64, max_prefill_tokens=512
            ),
        )
        first = make_request(tiny_lm, short, 20)
        engine.scheduler.add(first)
        await engine.step()  # the short prompt, whole: its answer has begun
        engine.scheduler.add(make_request(tiny_lm, long, 2))
        return [n for _, n in engine.scheduler.schedule()]

    assert asyncio.run(go()) == [1, 63]  # the decode, then what is left of 64


def test_prompt_chunks_beside_decoding_streams_are_capped(tiny_lm):
    """prefill_chunk_while_decoding: while a stream decodes, the prompt tokens of an iteration
    (a running prompt's chunk, a newcomer's first) are at most that many, all prompts together;
    decodes are never held back; with no stream decoding the budget is whole again."""
    short, long, other = list(range(1000, 1010)), list(range(2000, 2050)), [7, 8, 9, 10, 11]

    async def go(cap: int) -> list[list[int]]:
        engine = PagedEngine(
            tiny_lm,
            EngineConfig(
                block_size=4,
                num_kv_blocks=256,
                max_num_batched_tokens=64,
                prefill_chunk_while_decoding=cap,
            ),
        )
        engine.scheduler.add(make_request(tiny_lm, short, 30))
        await engine.step()  # the short prompt, whole: its answer has begun
        engine.scheduler.add(make_request(tiny_lm, long, 2))
        engine.scheduler.add(make_request(tiny_lm, other, 2))
        chunks = recorded_schedule(engine)
        for _ in range(5):
            await engine.step()
        return chunks

    assert asyncio.run(go(12)) == [[1, 12], [1, 12], [1, 12], [1, 12], [1, 2, 5]]
    assert asyncio.run(go(0))[0] == [1, 50, 5]  # off: the token budget alone
    lone = list(range(3000, 3100))
    assert chunks_of(tiny_lm, [lone], 2, max_num_batched_tokens=64, prefill_chunk_while_decoding=8)[
        :2
    ] == [[64], [36]]  # nothing decodes: the whole budget


def test_plain_greedy_rows_take_one_argmax_and_the_others_sample_themselves(tiny_lm):
    """_sample takes the argmax of every row in one call for the requests that are plain greedy
    (their own `sample` is not called), and lets a biased, a penalized or a sampling request
    shape and choose from its own row; logprobs are still each request's."""

    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=32))
        plain = make_request(tiny_lm, [5, 6], 4, logprobs=2)
        biased = make_request(tiny_lm, [5, 6], 4, logit_bias={7: 100.0})
        penalized = make_request(tiny_lm, [5, 6], 4, presence_penalty=2.0)
        sampling = make_request(tiny_lm, [5, 6], 4, temperature=1.0, seed=3)
        requests = [plain, biased, penalized, sampling]
        penalized.token_ids.append(3)  # an output token to penalize: 3, the argmax below
        plain.sample = lambda *_: 1 / 0  # type: ignore[method-assign]  # not called
        logits = torch.full((4, tiny_lm.config.vocab_size), -5.0)
        logits[:, 3], logits[:, 4] = 2.0, 1.5  # argmax 3 on every row
        seqs = [engine.scheduler.new_sequence(r) for r in requests]
        sampled, _ = engine._sample(seqs, logits, {})
        return [token for _, token in sampled], plain

    tokens, plain = asyncio.run(go())
    assert tokens[:3] == [3, 7, 4]  # argmax; the bias's token; 3 penalized below 4
    assert isinstance(tokens[3], int)
    assert plain.sampler.last_logprobs is not None and plain.sampler.last_logprobs.token_id == 3
