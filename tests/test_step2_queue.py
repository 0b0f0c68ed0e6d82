"""Step 2: FIFO order, the queue at its bound, a disconnect while queued."""

from __future__ import annotations

import asyncio

import pytest

from common.config import ServerConfig
from common.errors import APIError
from common.model import load_model
from common.request import RequestStatus
from step2_queue.queue import QueueEngine, RequestQueue
from tests.engine_helpers import drain, make_request, until


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_requests_are_served_one_at_a_time_in_arrival_order(tiny_lm):
    async def go():
        engine = QueueEngine(tiny_lm, RequestQueue(8))
        engine.start()
        requests = [make_request(tiny_lm, f"prompt number {i}", 20) for i in range(4)]
        for r in requests:
            await engine.submit(r)
        await asyncio.gather(*(drain(r) for r in requests))
        await engine.stop()
        return requests

    requests = run(go())
    for earlier, later in zip(requests, requests[1:], strict=False):
        # The next request starts only after the previous one has finished.
        assert earlier.finish_time <= later.first_token_time
        assert earlier.queue_wait_s <= later.queue_wait_s


def test_queue_bound_empty_full_and_one_over(tiny_lm):
    async def go():
        engine = QueueEngine(tiny_lm, RequestQueue(2))
        engine.start()
        busy = make_request(tiny_lm, "keep the worker busy", 1500)
        await engine.submit(busy)
        await until(lambda: busy.first_token_time is not None)  # taken: the queue is empty
        assert engine.queue.depth == 0
        waiting = [make_request(tiny_lm, f"w{i}", 3) for i in range(2)]
        for r in waiting:
            await engine.submit(r)  # exactly full is fine
        assert engine.queue.depth == 2
        with pytest.raises(APIError) as err:
            await engine.submit(make_request(tiny_lm, "one too many", 3))
        busy.cancel()
        texts = await asyncio.gather(*(drain(r) for r in waiting))
        await engine.stop()
        return err.value, waiting, texts

    error, waiting, texts = run(go())
    assert error.status == 429 and error.code == "queue_full"
    assert all(r.status == RequestStatus.FINISHED for r in waiting)


def test_a_request_cancelled_while_queued_never_reaches_the_model(tiny_lm):
    async def go():
        engine = QueueEngine(tiny_lm, RequestQueue(4))
        engine.start()
        busy = make_request(tiny_lm, "busy", 300)
        gone = make_request(tiny_lm, "client leaves", 50)
        after = make_request(tiny_lm, "after", 5)
        for r in (busy, gone, after):
            await engine.submit(r)
        gone.cancel()
        await drain(busy)
        await drain(after)
        await engine.stop()
        return gone, after

    gone, after = run(go())
    assert gone.status == RequestStatus.CANCELLED
    assert gone.num_output_tokens == 0 and gone.first_token_time is None
    assert after.status == RequestStatus.FINISHED


def test_queue_full_is_an_openai_429_over_http(start_server, tiny_model_dir):
    import httpx

    server = start_server(
        "step2_queue", GATEWAY_MODEL=str(tiny_model_dir), GATEWAY_MAX_QUEUE_SIZE="1"
    )
    long = {"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 1500, "stream": True}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.url + "/v1/completions", json=long) as running,
    ):
        lines = running.iter_lines()  # keep a reference: a dropped iterator closes the stream
        next(lines)  # the worker has it
        with http.stream("POST", server.url + "/v1/completions", json=long) as queued:
            assert queued.status_code == 200  # headers come before the first token
            rejected = http.post(server.url + "/v1/completions", json={**long, "stream": False})
    assert rejected.status_code == 429
    assert rejected.json()["error"]["code"] == "queue_full"
