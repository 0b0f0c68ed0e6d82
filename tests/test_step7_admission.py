"""Step 7's admission also counts KV blocks: the prompts waiting, plus the newcomer's, must fit
in the blocks free right now, or the newcomer gets a 429 (reason kv_blocks) with Retry-After."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from common.errors import APIError
from common.request import Request
from common.sampling import SamplingParams
from step6_backpressure.lifecycle import Lifecycle, LifecycleConfig
from step7_real_kv.block_manager import BlockManager
from step7_real_kv.engine import EngineConfig
from step7_real_kv.kv_admission import KVAdmission
from step7_real_kv.scheduler import Scheduler
from tests.test_step6_backpressure import limits, metric


def test_kv_admission_counts_free_blocks_and_waiting_prompts(tokenizer):
    def request(prompt_tokens: int) -> Request:
        params = SamplingParams(temperature=0.0)
        return Request([42] * prompt_tokens, params, 4, tokenizer, {tokenizer.eos_token_id})

    def rejected(admission: KVAdmission, prompt_tokens: int) -> APIError:
        with pytest.raises(APIError) as caught:
            admission.admit(request(prompt_tokens))
        return caught.value

    async def scenario() -> None:
        blocks = BlockManager(num_blocks=10, block_size=4)
        held = blocks.allocate(7)  # running sequences hold 7 of the 10 blocks
        scheduler = Scheduler(blocks, EngineConfig(block_size=4, num_kv_blocks=10))
        lifecycle = Lifecycle(LifecycleConfig())
        # The scheduler answers what the door asks of an engine: load, kv_demand, expire.
        admission = KVAdmission(limits(), scheduler, lifecycle)  # at most 4 waiting, 100 tokens

        def admit(r: Request) -> None:  # as the server does: admission, then the engine's queue
            admission.admit(r)
            scheduler.add(r)

        error = rejected(admission, 13)  # 4 blocks, 3 free
        assert (error.status, error.code) == (429, "kv_blocks")
        assert int(error.headers["Retry-After"]) >= 1
        waiting = request(8)
        admit(waiting)  # 2 blocks: fits, and now waits
        assert rejected(admission, 5).code == "kv_blocks"  # 2 waiting + 2 > 3 free
        waiting.cancel()  # its client left: its blocks stop counting at once
        admit(request(5))  # 2 blocks of 3 free
        assert rejected(admission, 5).code == "kv_blocks"  # 2 waiting + 2 > 3 free
        admit(request(4))  # 2 waiting + 1 = 3: exactly fits

        blocks.free(held)  # the running sequences finish
        admit(request(13))  # 3 waiting + 4 <= 10 free
        assert admission.reasons["rejected:kv_blocks"] == 3

        assert rejected(admission, 16).code == "kv_blocks"  # 7 waiting + 4 > 10 free
        lifecycle.start_drain()  # draining outranks a full pool: 503, not 429
        assert rejected(admission, 16).status == 503

    asyncio.run(scenario())


@pytest.mark.integration
def test_a_prompt_that_does_not_fit_the_free_blocks_gets_a_429(start_server, tokenizer):
    server = start_server(
        "step7_real_kv",
        GATEWAY_NUM_KV_BLOCKS="8",  # 8 blocks x 16 slots = 128 tokens in all
        GATEWAY_BLOCK_SIZE="16",
        GATEWAY_RESPONSE_CACHE="false",
    )
    long_prompt, short_prompt = " apple" * 90, " pear" * 40
    assert 81 <= len(tokenizer.encode(long_prompt, add_special_tokens=False)) <= 96  # 6 blocks
    assert 33 <= len(tokenizer.encode(short_prompt, add_special_tokens=False)) <= 48  # 3 blocks
    model = "SmolLM2-135M-Instruct"
    small = {"model": model, "prompt": short_prompt, "max_tokens": 4, "temperature": 0}
    busy = {**small, "prompt": long_prompt, "max_tokens": 30, "stream": True}

    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", server.url + "/v1/completions", json=busy) as stream,
    ):
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # running, holding 6 blocks
        used_while_running = metric(server.url, "gateway_kv_blocks_used")
        refused = http.post(server.url + "/v1/completions", json=small)
        for _ in lines:  # let the long one finish: its blocks come back
            pass
        admitted = http.post(server.url + "/v1/completions", json=small)

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "kv_blocks"
    assert int(refused.headers["retry-after"]) >= 1
    assert admitted.status_code == 200
    assert metric(server.url, "gateway_admission_events_total", reason="rejected:kv_blocks") == 1
    assert used_while_running >= 6
    assert metric(server.url, "gateway_kv_blocks_used") == 0
