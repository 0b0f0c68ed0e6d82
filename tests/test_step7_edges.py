"""Step 7 at its edges: one owner for every piece of state, the request pipeline in its order.

- A cache hit is answered before the door: it gets its 200 even when the KV pool is full.
- The prefix cache's counters do not move while a blocked request waits.
- A block's name has one record (the block manager); two sequences that computed the same
  prefix keep naming their blocks correctly after it.
- Deadlines, counts, cancellation and the choices that fork go through the scheduler, which
  owns the queues; a choice forks only with a free block for its copy of a partial block.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from common.config import ServerConfig
from common.errors import APIError
from common.model import load_model
from common.prefix import block_hashes
from common.request import RequestStatus
from step7_real_kv.engine import EngineConfig, PagedEngine
from tests.engine_helpers import drain, make_request
from tests.test_step6_backpressure import metric


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def test_prefix_cache_counters_do_not_move_while_a_blocked_request_waits(tiny_lm):
    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=6))
        running = make_request(tiny_lm, list(range(100, 116)), 4)  # 16 tokens: 4 of 6 blocks
        await engine.submit(running)
        await engine.step()  # it runs, and holds 5 blocks once its first token is in
        blocked = make_request(tiny_lm, list(range(200, 212)), 4)  # 3 blocks: no room
        await engine.submit(blocked)
        stats = engine.blocks.stats
        before = (stats.queried_tokens, stats.hit_tokens)
        steps = 0
        while blocked.status is RequestStatus.WAITING:
            assert (stats.queried_tokens, stats.hit_tokens) == before, f"after {steps} steps"
            await engine.step()
            steps += 1
        assert steps > 1  # it really waited, iteration after iteration
        while engine.scheduler.has_work:
            await engine.step()
        return before, (stats.queried_tokens, stats.hit_tokens), blocked

    before, after, blocked = asyncio.run(go())
    assert after[0] - before[0] == blocked.num_prompt_tokens - 1  # looked up once, when let in


def test_a_prefix_computed_twice_keeps_one_record_of_each_blocks_name(tiny_lm):
    """Two sequences with the same prompt start in the same iteration: neither finds the
    other's blocks, both compute them. The first block of each name is the findable one; the
    second keeps its own name, so its sequence's later blocks chain on correctly."""
    prompt = list(range(300, 312))  # 3 full blocks of 4

    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=32))
        twins = [make_request(tiny_lm, prompt, 9) for _ in range(2)]
        for request in twins:
            await engine.submit(request)
        tables: dict[int, list[int]] = {}
        while engine.scheduler.has_work:
            await engine.step()
            for i, seq in enumerate(engine.scheduler.running):
                tables[i] = list(seq.block_table)  # the last table each one had
        return engine, twins, [tables[0], tables[1]]

    engine, twins, tables = asyncio.run(go())
    assert twins[0].output_ids == twins[1].output_ids
    assert tables[0][:3] != tables[1][:3]  # the prompt was computed twice, in other blocks
    chain = block_hashes(twins[0].token_ids, 4)  # every full block's name, in order
    for table in tables:  # each block knows its own name, the second twin's blocks too
        full = table[: len(chain)]
        assert [engine.blocks.block_hash[b] for b in full] == chain[: len(full)]
    assert [engine.blocks.by_hash[k] for k in chain[:3]] == tables[0][:3]  # the first is found


def test_the_scheduler_owns_the_deadline_of_a_waiting_request(tiny_lm):
    """A request that has not started is taken out and failed; a running one is not."""

    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=64))
        first, second = make_request(tiny_lm, "Hello", 6), make_request(tiny_lm, "Hi", 6)
        await engine.submit(first)
        await engine.step()  # first runs
        await engine.submit(second)  # second waits
        error = APIError("late", 503, code="queue_timeout")
        assert engine.load().waiting == 1 and engine.load().running == 1
        assert not engine.expire(first, error)  # started: the engine finishes it
        assert engine.expire(second, error)
        assert engine.load().waiting == 0
        with pytest.raises(APIError):
            await drain(second)
        while engine.scheduler.has_work:
            await engine.step()
        return first

    assert asyncio.run(go()).status is RequestStatus.FINISHED


def test_a_cancelled_request_stops_counting_at_once_and_the_engine_records_it(tiny_lm):
    async def go():
        engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=64))
        request = make_request(tiny_lm, "Hello there", 50)
        await engine.submit(request)
        await engine.step()
        request.cancel()  # the client left: only the flag is raised
        counted = engine.load().running
        status = request.status
        await engine.step()  # the engine lets go of it, and records why
        return counted, status, request.status, engine.blocks.num_free

    counted, status_at_cancel, status_after, free = asyncio.run(go())
    assert counted == 0 and status_at_cancel is RequestStatus.RUNNING
    assert status_after is RequestStatus.CANCELLED and free == 64


@pytest.mark.integration
def test_a_cache_hit_gets_its_200_while_the_kv_pool_is_full(start_server, tokenizer):
    """The pipeline: validate -> response cache -> admission -> engine. A repeated greedy
    request is answered from the cache without asking the door for KV blocks."""
    server = start_server(
        "step7_real_kv",
        GATEWAY_NUM_KV_BLOCKS="8",  # 8 blocks x 16 slots = 128 tokens in all
        GATEWAY_BLOCK_SIZE="16",
    )
    model = "SmolLM2-135M-Instruct"
    small = {"model": model, "prompt": " pear" * 40, "max_tokens": 4, "temperature": 0}
    other = {**small, "prompt": " plum" * 40}
    busy = {**small, "prompt": " apple" * 90, "max_tokens": 30, "stream": True}
    url = server.url + "/v1/completions"
    no_cache = {"cache-control": "no-cache"}
    with httpx.Client(timeout=120) as http:
        first = http.post(url, json=small)  # generated, then stored
        with http.stream("POST", url, json=busy, headers=no_cache) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))  # holding 6 blocks
            refused = http.post(url, json=other)  # would need 3 blocks: 429 kv_blocks
            repeated = http.post(url, json=small)  # the cache answers: no blocks needed
            for _ in lines:
                pass
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "kv_blocks"
    assert repeated.status_code == 200 and repeated.headers["x-cache"] == "hit"
    assert repeated.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
    assert metric(server.url, "gateway_admission_events_total", reason="rejected:kv_blocks") == 1


@pytest.mark.integration
def test_the_server_says_which_backends_it_runs(start_server, tiny_model_dir):
    server = start_server("step7_real_kv", GATEWAY_MODEL=str(tiny_model_dir))
    text = httpx.get(server.url + "/metrics", timeout=10).text
    info = [line for line in text.splitlines() if line.startswith("gateway_engine_info{")]
    assert len(info) == 1 and 'device="cpu"' in info[0], info
    backends = "kernels=" + info[0].split('kernels="')[1].split('"')[0]
    assert backends in server.log()  # and its start-up log line says the same


@pytest.mark.integration
def test_required_kernels_that_cannot_load_stop_the_start_up(
    start_server, tiny_model_dir, tmp_path
):
    env = {
        "GATEWAY_MODEL": str(tiny_model_dir),
        "GATEWAY_KERNELS": "cpp",
        "GATEWAY_CACHE_DIR": str(tmp_path / "empty-cache"),  # no build here
        "CXX": "/bin/false",  # and none can be made
    }
    with pytest.raises(RuntimeError) as exited:
        start_server("step7_real_kv", **env)
    assert "C++ kernels are required" in str(exited.value)


# ---------------------------------------------------------------- n > 1: one prompt, n choices


def choices_of(tiny_lm, prompt: list[int], n: int, max_tokens: int, **sampling):
    """n choices of one request, as the API makes them: one channel, siblings, seeds + i.
    (Inside a running event loop: the channel belongs to it.)"""
    from common.request import DeltaChannel

    channel = DeltaChannel()
    requests = []
    for i in range(n):
        seeded = {**sampling, "seed": sampling["seed"] + i} if "seed" in sampling else sampling
        request = make_request(tiny_lm, prompt, max_tokens, **seeded)
        request.channel, request.index = channel, i
        requests.append(request)
    for request in requests:
        request.siblings = requests
    return requests


def run_counting(engine: PagedEngine, make, before_step=None):
    """Submit what `make()` returns and step to the end. Returns (the requests, tokens run
    through the model, most KV blocks held at once)."""
    computed, most = 0, 0
    forward = engine.runner.forward

    def counting(batch):
        nonlocal computed
        computed += batch.num_tokens
        return forward(batch)

    engine.runner.forward = counting

    async def go():
        nonlocal most
        requests = make()
        for request in requests:
            await engine.submit(request)
        steps = 0
        while engine.scheduler.has_work:
            if before_step is not None:
                before_step(steps, requests)
            await engine.step()
            steps += 1
            most = max(most, engine.blocks.num_blocks - engine.blocks.num_free)
        return requests

    return asyncio.run(go()), computed, most


def alone(tiny_lm, prompt: list[int], max_tokens: int) -> list[int]:
    engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=64))
    (request,), _, _ = run_counting(engine, lambda: [make_request(tiny_lm, prompt, max_tokens)])
    return request.output_ids


def test_n_choices_share_the_prompts_blocks_and_compute_it_once(tiny_lm):
    prompt = [(7 * i) % 4000 + 100 for i in range(300)]  # 300 tokens: 18 full blocks + 12
    config = EngineConfig(block_size=16, num_kv_blocks=256)
    one = lambda: [make_request(tiny_lm, prompt, 6)]  # noqa: E731
    _, alone_tokens, alone_blocks = run_counting(PagedEngine(tiny_lm, config), one)
    four, computed, blocks = run_counting(
        PagedEngine(tiny_lm, config),
        lambda: choices_of(tiny_lm, prompt, 4, 6, temperature=1.0, seed=3),
    )
    assert alone_tokens == 300 + 5 and alone_blocks == 19  # the prompt, then 5 decodes
    assert computed == 300 + 4 * 5  # the prompt once, then each choice's own decodes
    # 4 x 19 = 76 if each had its own; shared: the prompt's 18 full blocks, then at most 2
    # of each choice's own (its copy of the prompt's last block, and the next one)
    assert blocks <= 18 + 4 * 2
    assert all(len(r.output_ids) == 6 for r in four)
    assert len({tuple(r.output_ids) for r in four}) > 1  # each its own sampler


def test_a_cancelled_choice_leaves_the_others_running(tiny_lm):
    prompt = list(range(500, 530))
    engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=64))

    def cancel_after_the_prompt(steps, requests):
        if steps == 1:
            requests[1].cancel()

    requests, _, _ = run_counting(
        engine, lambda: choices_of(tiny_lm, prompt, 3, 12), cancel_after_the_prompt
    )
    assert requests[1].status is RequestStatus.CANCELLED and 0 < len(requests[1].output_ids) < 12
    expected = alone(tiny_lm, prompt, 12)
    assert requests[0].output_ids == requests[2].output_ids == expected  # greedy, undisturbed
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_choice_whose_sampling_fails_fails_alone(tiny_lm):
    prompt = list(range(600, 622))
    engine = PagedEngine(tiny_lm, EngineConfig(block_size=4, num_kv_blocks=64))

    def make():
        requests = choices_of(tiny_lm, prompt, 3, 8)
        requests[2].sampler.took = lambda *_: 1 / 0  # (greedy: its row's argmax taken in one call)
        return requests

    requests, _, _ = run_counting(engine, make)
    expected = alone(tiny_lm, prompt, 8)
    assert requests[0].output_ids == requests[1].output_ids == expected
    assert requests[2].finished and requests[2].output_ids == []
    assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize(
    ("prompt_length", "free", "forked"), [(6, 2, 2), (6, 1, 1), (6, 0, 0), (8, 0, 2)]
)
def test_choices_fork_while_a_block_is_free_for_each_copy_and_the_rest_start_alone(
    tiny_lm, prompt_length, free, forked
):
    """n = 3. A 6-token prompt ends inside the leader's second block of 4: each choice that
    forks needs a free block for its copy of it, and those there is none for start on their
    own, first in line, in their order. An 8-token prompt ends on a block's edge: the choices
    only share the leader's blocks, and need none free."""
    from step7_real_kv.block_manager import BlockManager
    from step7_real_kv.scheduler import Scheduler, SchedulerConfig

    async def go():
        requests = choices_of(tiny_lm, list(range(5, 5 + prompt_length)), 3, 4)
        scheduler = Scheduler(BlockManager(2 + free, 4), SchedulerConfig())
        for request in requests:
            scheduler.add(request)
        work = scheduler.schedule()  # the leader's whole prompt, in its 2 blocks
        assert [(s.request, n) for s, n in work] == [(requests[0], prompt_length)]
        return requests, scheduler, scheduler.forks_due(work)

    requests, scheduler, due = asyncio.run(go())
    assert [(s.request, children) for s, children in due.items()] == [
        (requests[0], requests[1 : 1 + forked])
    ]
    assert [s.request for s in scheduler.waiting] == requests[1 + forked :]
    assert scheduler.forks == {}
