"""Step 4's response cache, moved in front of the fleet: whole answers, shared through Redis.

What changes: step 4 keyed an answer by the prompt's token ids and stored its text and tokens;
the router never tokenizes, so it keys a deterministic request (greedy, or seeded) by its JSON
body as sent (keys sorted, `stream` left out: a field this API ignores may mean something to
another engine), and stores the replica's whole JSON answer. Only non-streamed answers are
stored and served: a stream passes through untouched. What stays: the backends (in-process LRU,
or Redis with a TTL when `redis_url` is set, so that every router process shares one cache),
Cache-Control: no-cache, the bypass and cool-down when Redis fails, and the counters.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from common.protocol import GenerationRequest
from step4_mock_kv.response_cache import ResponseCache, ResponseCacheConfig, make_response_cache


class AnswerCache(ResponseCache):
    def answer_key(
        self, path: str, body: bytes, request: GenerationRequest, no_cache: bool
    ) -> str | None:
        """The key of a cacheable request, or None (streamed, sampled without a seed, opted
        out). `body` is the JSON `request` was parsed from."""
        if request.stream or no_cache or not request.sampling().deterministic:
            self.stats.skipped += 1
            return None
        fields = {
            k: v for k, v in json.loads(body).items() if k not in ("stream", "stream_options")
        }
        normalized = {"model": self.model, "path": path, "request": fields}
        digest = hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()
        return f"gateway:answer:{digest}"

    async def get_answer(self, key: str) -> bytes | None:
        """The stored answer with a fresh id and creation time, or None."""
        self.stats.queries += 1
        raw = await self._guarded("get", self.backend.get(key))
        if raw is None:
            return None
        self.stats.hits += 1
        answer = json.loads(raw)
        kind = str(answer.get("id", "cmpl")).split("-")[0]
        answer.update(id=f"{kind}-{uuid.uuid4().hex}", created=int(time.time()))
        return json.dumps(answer, ensure_ascii=False).encode()

    async def put_answer(self, key: str, content: bytes | memoryview) -> None:
        await self._guarded("set", self.backend.set(key, bytes(content).decode()))


def make_answer_cache(config: ResponseCacheConfig, model: str) -> AnswerCache | None:
    """Step 4's choice of backend (in-process, or Redis), holding whole answers; None when off."""
    cache = make_response_cache(config, model)
    return None if cache is None else AnswerCache(cache.backend, model)
