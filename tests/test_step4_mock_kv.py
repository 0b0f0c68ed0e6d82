"""Step 4: the mock prefix cache at block boundaries, eviction and pinning, token identity with
and without a hit on the real model, and the hot-response cache (in-process)."""

from __future__ import annotations

import asyncio
import functools

import pytest
import torch

from common.config import ServerConfig
from common.generation import generate
from common.model import load_model
from common.prefix import block_hashes
from step3_batching.batcher import run_batch
from step4_mock_kv.prefix_cache import MockPrefixCache
from step4_mock_kv.prefix_prefill import _run
from tests.conftest import tiny_client
from tests.engine_helpers import make_request

BS = 4  # block size in these tests


def fake_kv(tokens: list[int], layers: int = 2) -> list:
    """KV whose values are the token ids, so a slice shows exactly which tokens it covers."""
    t = torch.tensor(tokens, dtype=torch.float32).view(1, 1, -1, 1)
    return [(t.clone(), t.clone() + 0.5) for _ in range(layers)]


def cached_tokens(hit) -> list[int]:
    return hit.state[0][0].flatten().int().tolist() if hit.num_tokens else []


def test_block_hashes_are_chained():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2  # the partial third block has no name
    assert a[1] != b[1]  # same second block, different history: different name
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS) == a


@pytest.mark.parametrize(
    "prompt_len, expected_hit",
    [
        (4, 0),  # exactly one block: its last token must be prefilled, so no usable block
        (5, 4),  # one block plus one token: the block is reused
        (8, 4),  # two blocks, one token short of using the second
        (9, 8),  # two blocks plus one token
        (12, 8),  # the cached prefix ends at 8; nothing longer is stored
    ],
)
def test_longest_prefix_match_at_block_boundaries(prompt_len, expected_hit):
    cache = MockPrefixCache(BS, 1 << 20)
    stored = list(range(100, 111))  # 11 tokens: two full blocks are kept
    cache.insert(stored, fake_kv(stored))
    prompt = list(range(100, 100 + prompt_len))
    hit = cache.match(prompt[:-1])  # the last prompt token always runs: its logits are needed
    assert hit.num_tokens == expected_hit
    assert cached_tokens(hit) == prompt[:expected_hit]
    cache.release(hit)


def test_a_different_first_block_never_matches():
    cache = MockPrefixCache(BS, 1 << 20)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], fake_kv([1, 2, 3, 4, 5, 6, 7, 8]))
    assert cache.match([0, 2, 3, 4, 5, 6, 7, 8, 9]).num_tokens == 0


def test_hit_and_query_counts_are_in_tokens():
    cache = MockPrefixCache(BS, 1 << 20)
    tokens = list(range(9))
    cache.release(cache.match(tokens))
    cache.insert(tokens, fake_kv(tokens))
    cache.release(cache.match(tokens))
    assert (cache.stats.queried_tokens, cache.stats.hit_tokens) == (18, 8)


def entry_bytes(n_tokens: int) -> int:
    return sum(k.nbytes + v.nbytes for k, v in fake_kv(list(range(n_tokens))))


def test_lru_eviction_under_the_byte_budget():
    cache = MockPrefixCache(BS, 2 * entry_bytes(4))  # room for two one-block entries
    prompts = [[p] * 5 for p in (1, 2, 3)]
    for p in prompts[:2]:
        cache.insert(p, fake_kv(p))
    cache.release(cache.match(prompts[0]))  # touch 1: now 2 is the least recently used
    cache.insert(prompts[2], fake_kv(prompts[2]))
    assert cache.used_bytes <= cache.budget_bytes
    assert cache.stats.evictions == 1
    assert [cache.match(p).num_tokens for p in prompts] == [4, 0, 4]


def test_pinned_entries_are_not_evicted_until_released():
    cache = MockPrefixCache(BS, entry_bytes(4))  # room for one entry
    first, second = [1] * 5, [2] * 5
    cache.insert(first, fake_kv(first))
    pinned = cache.match(first)
    cache.insert(second, fake_kv(second))  # over budget: only the unpinned entry may go
    assert cache.match(second).num_tokens == 0
    again = cache.match(first)
    assert again.num_tokens == 4
    cache.release(again)
    cache.release(pinned)
    cache.insert(second, fake_kv(second))  # `first` is free now, and least recently used
    assert cache.match(first).num_tokens == 0
    assert cache.match(second).num_tokens == 4
    assert cache.stats.evictions == 2


def test_an_entry_bigger_than_the_budget_is_not_kept():
    cache = MockPrefixCache(BS, entry_bytes(4) - 1)
    cache.insert([1] * 5, fake_kv([1] * 5))
    assert cache.used_bytes == 0 and cache.match([1] * 5).num_tokens == 0


@pytest.mark.integration
def test_greedy_tokens_identical_with_and_without_a_prefix_hit(real_model_dir):
    lm = load_model(ServerConfig(model=str(real_model_dir)))
    system = "You are a careful assistant for a library. Answer briefly and accurately. " * 3
    prompts = ["What is the capital of France?", "Name a famous novel.", "Hi"]

    def ids(p):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": p}]
        return lm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )

    async def go():
        prefix_cache = MockPrefixCache(16, 256 << 20)
        plain, rounds = [], []
        for p in prompts:
            r = make_request(lm, ids(p), 16)
            await asyncio.to_thread(generate, lm, r)
            plain.append(r.output_ids)
        for _ in range(2):  # the first round fills the cache, the second hits it
            batch = [make_request(lm, ids(p), 16) for p in prompts]
            compute = functools.partial(_run, prefix_cache=prefix_cache)
            await asyncio.to_thread(run_batch, lm, batch, compute)
            rounds.append(batch)
        return plain, rounds

    plain, rounds = asyncio.run(go())
    assert all(r.cached_prompt_tokens > 0 for r in rounds[1])
    for batch in rounds:
        assert [r.output_ids for r in batch] == plain


# ---------------------------------------------------------------- the response cache over HTTP

CHAT = "/v1/chat/completions"


def chat(content: str, **fields) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 6,
        **fields,
    }


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with tiny_client("step4_mock_kv", tiny_model_dir) as c:
        yield c


def test_response_cache_miss_then_hit(client):
    first = client.post(CHAT, json=chat("cache me", temperature=0))
    second = client.post(CHAT, json=chat("cache me", temperature=0))
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]


def test_cached_answer_replays_as_sse(client):
    body = chat("stream me", temperature=0)
    whole = client.post(CHAT, json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", CHAT, json={**body, "stream": True}) as response:
        assert response.headers["x-cache"] == "hit"
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def test_seeded_requests_are_cached_but_unseeded_sampling_never(client):
    seeded = chat("seeded", temperature=0.9, seed=5)
    client.post(CHAT, json=seeded)
    assert client.post(CHAT, json=seeded).headers["x-cache"] == "hit"
    unseeded = chat("unseeded", temperature=0.9)
    for _ in range(2):
        assert "x-cache" not in client.post(CHAT, json=unseeded).headers


def test_cache_control_no_cache_opts_out(client):
    body = chat("opt out", temperature=0)
    client.post(CHAT, json=body)
    response = client.post(CHAT, json=body, headers={"Cache-Control": "no-cache"})
    assert "x-cache" not in response.headers
    assert client.post(CHAT, json=body).headers["x-cache"] == "hit"


def test_different_parameters_are_different_entries(client):
    client.post(CHAT, json=chat("params", temperature=0))
    assert (
        client.post(CHAT, json=chat("params", temperature=0, max_tokens=7)).headers["x-cache"]
        == "miss"
    )
    assert (
        client.post(CHAT, json=chat("params", temperature=0, stop=["x"])).headers["x-cache"]
        == "miss"
    )
