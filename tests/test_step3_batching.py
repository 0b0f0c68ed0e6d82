"""Step 3: batches of 1, exactly max_batch_size and one over; mixed parameters in one batch;
greedy tokens identical to step 1's single-sequence path; cancellation and bad input."""

from __future__ import annotations

import asyncio

import pytest

from common.config import ServerConfig
from common.generation import generate
from common.model import load_model
from common.request import RequestStatus
from step2_queue.queue import RequestQueue
from step3_batching.batcher import BatchingEngine, left_pad, run_batch
from step3_batching.server import Config
from tests.conftest import tiny_client
from tests.engine_helpers import drain, make_request, until


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def test_left_pad_right_aligns_prompts():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("waiting, expected", [(1, [1]), (4, [4]), (5, [4, 1])])
def test_batch_sizes_one_exactly_full_and_one_over(tiny_lm, waiting, expected):
    async def go():
        engine = BatchingEngine(tiny_lm, RequestQueue(16), Config(max_batch_size=4, max_wait_ms=20))
        for i in range(waiting):
            await engine.submit(make_request(tiny_lm, f"p{i}", 2))
        sizes = []
        while sum(sizes) < waiting:
            sizes.append(len(await engine.next_batch()))
        return sizes

    assert run(go()) == expected


def test_worker_waits_up_to_max_wait_for_a_fuller_batch(tiny_lm):
    async def go():
        engine = BatchingEngine(
            tiny_lm, RequestQueue(16), Config(max_batch_size=4, max_wait_ms=2000)
        )
        await engine.submit(make_request(tiny_lm, "first", 2))
        pending = asyncio.ensure_future(engine.next_batch())
        await asyncio.sleep(0.05)
        await engine.submit(make_request(tiny_lm, "second", 2))
        return len(await pending)

    assert run(go()) == 2


def alone(lm, prompt, max_tokens, **sampling):
    async def go():
        request = make_request(lm, prompt, max_tokens, **sampling)
        await asyncio.to_thread(generate, lm, request)
        return request.output_ids

    return run(go())


def test_mixed_max_tokens_and_sampling_in_one_batch(tiny_lm):
    specs = [
        ("a short one", 3, {}),
        ("a longer prompt with more words in it", 17, {"temperature": 0.9, "seed": 11}),
        ("top k", 9, {"temperature": 1.3, "top_k": 5, "seed": 3}),
        ("top p", 12, {"temperature": 0.7, "top_p": 0.8, "seed": 5}),
    ]

    async def go():
        batch = [make_request(tiny_lm, p, n, **s) for p, n, s in specs]
        await asyncio.to_thread(run_batch, tiny_lm, batch)
        return batch

    batch = run(go())
    for request, (prompt, max_tokens, sampling) in zip(batch, specs, strict=True):
        assert request.num_output_tokens == max_tokens
        assert request.finish_reason == "length"
        # Each row samples with its own parameters and generator: same tokens as alone.
        assert request.output_ids == alone(tiny_lm, prompt, max_tokens, **sampling)


@pytest.mark.integration
def test_greedy_batch_is_token_identical_to_step1_on_the_real_model(real_model_dir):
    lm = load_model(ServerConfig(model=str(real_model_dir)))
    prompts = [
        "What is the capital of France?",
        "Hi",
        "Explain gravity to a child in two sentences, please, with an example.",
        "List five fruits.",
    ]

    def chat_ids(prompt):
        messages = [{"role": "user", "content": prompt}]
        return lm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    async def go():
        singles, batch = [], []
        for p in prompts:
            r = make_request(lm, chat_ids(p), 20)
            await asyncio.to_thread(generate, lm, r)
            singles.append(r.output_ids)
            batch.append(make_request(lm, chat_ids(p), 20))
        await asyncio.to_thread(run_batch, lm, batch)
        return singles, [b.output_ids for b in batch]

    singles, batched = run(go())
    assert batched == singles


def test_a_cancelled_row_stops_and_the_others_finish_unharmed(tiny_lm):
    async def go():
        engine = BatchingEngine(tiny_lm, RequestQueue(16), Config(max_batch_size=3, max_wait_ms=50))
        engine.start()
        keep = [make_request(tiny_lm, f"keep {i}", 400) for i in range(2)]
        leave = make_request(tiny_lm, "leave", 400)
        for r in (*keep, leave):
            await engine.submit(r)
        await until(lambda: leave.num_output_tokens >= 3)
        leave.cancel()
        texts = await asyncio.gather(*(drain(r) for r in keep))
        await engine.stop()
        return keep, leave, texts

    rows = []
    hook = tiny_lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        keep, leave, _ = run(go())
    finally:
        hook.remove()
    assert leave.status == RequestStatus.CANCELLED and leave.num_output_tokens < 400
    # The cancelled row left the batch at once: the forward passes went from 3 rows to 2.
    assert rows[0] == 3 and rows[-1] == 2 and rows == sorted(rows, reverse=True)
    for i, request in enumerate(keep):
        assert request.num_output_tokens == 400
        assert request.output_ids == alone(tiny_lm, f"keep {i}", 400)


def test_a_fault_in_one_row_fails_that_row_alone(tiny_lm):
    """Sampling and detokenizing are per row: the other rows of the static batch finish exactly
    as they would alone."""

    async def go():
        rows = [make_request(tiny_lm, p, 12) for p in ("keep a", "bad", "keep b")]
        rows[1].sampler.sample = lambda *_: 1 / 0
        await asyncio.to_thread(run_batch, tiny_lm, rows)
        with pytest.raises(ZeroDivisionError):
            await drain(rows[1])
        return [await drain(r) for r in (rows[0], rows[2])], rows

    texts, rows = run(go())
    assert rows[0].output_ids == alone(tiny_lm, "keep a", 12)
    assert rows[2].output_ids == alone(tiny_lm, "keep b", 12)
    assert texts == [tiny_lm.tokenizer.decode(r.output_ids) for r in (rows[0], rows[2])]


def test_a_bad_request_never_reaches_a_batch(tiny_model_dir):
    with tiny_client("step3_batching", tiny_model_dir) as client:
        engine = client.app.state.serving.engine
        submitted = []
        real_submit = engine.submit

        async def recording_submit(request):
            submitted.append(request)
            await real_submit(request)

        engine.submit = recording_submit
        model = "SmolLM2-135M-Instruct"
        bad = [
            {"model": model, "prompt": "x", "max_tokens": -1},
            {"model": model, "prompt": "x", "temperature": "warm"},
            {"model": "other", "prompt": "x"},
            {"model": model, "prompt": [1] * 5000},
        ]
        for body in bad:
            assert client.post("/v1/completions", json=body).status_code == 400
        assert submitted == []
        good = {"model": model, "prompt": "x", "max_tokens": 2}
        assert client.post("/v1/completions", json=good).status_code == 200
        assert len(submitted) == 1
