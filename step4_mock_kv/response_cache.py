"""The hot-response cache: answer a repeated deterministic request without running the model.

A request is cacheable when its answer is fully determined by its input: greedy (temperature 0)
or sampled with a fixed seed. Its key hashes the served model and the normalized request (prompt
token ids, max_tokens, every sampling parameter, stop sequences). Backends: an in-process LRU by
default, Redis (shared by every server process, with a TTL) when a Redis URL is configured.

A cache never fails a request: a Redis that is down or slow (past a short timeout) is bypassed,
counted and logged, and the request is generated as usual. After a failure Redis is left alone
for a cool-down, so an outage does not add a timeout to every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Protocol

from common.config import ConfigPart, knob
from common.request import Request

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class ResponseCacheConfig(ConfigPart):
    response_cache: bool = knob(True, "answer repeated deterministic requests from a cache")
    response_cache_entries: int = knob(1024, "entries kept by the in-process cache")
    response_cache_ttl_s: float = knob(300.0, "seconds an answer stays cached")
    redis_url: str = knob("", "e.g. redis://127.0.0.1:6379/0: a cache shared by processes")
    redis_timeout_s: float = knob(0.1, "a slower Redis call is abandoned (the request goes on)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.response_cache_entries < 1 or self.response_cache_ttl_s <= 0:
            raise ValueError("response_cache_entries must be >= 1 and response_cache_ttl_s > 0")


def make_response_cache(config: ResponseCacheConfig, model: str) -> ResponseCache | None:
    """The configured cache for answers of `model`, or None when it is switched off."""
    if not config.response_cache:
        return None
    if config.redis_url:
        ttl, timeout = config.response_cache_ttl_s, config.redis_timeout_s
        return ResponseCache(RedisBackend(config.redis_url, ttl, timeout), model)
    backend = MemoryBackend(config.response_cache_entries, config.response_cache_ttl_s)
    return ResponseCache(backend, model)


@dataclass(frozen=True)
class CachedResponse:
    text: str
    output_ids: list[int]
    finish_reason: str


@dataclass
class ResponseCacheStats:
    queries: int = 0
    hits: int = 0
    skipped: int = 0  # not deterministic, or opted out
    errors: int = 0  # backend failures that were bypassed


class Backend(Protocol):
    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str) -> None: ...


class MemoryBackend:
    """In-process LRU with a TTL: no setup, private to this server process."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._items: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, key: str) -> str | None:
        item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            self._items.pop(key, None)
            return None
        self._items.move_to_end(key)
        return item[1]

    async def set(self, key: str, value: str) -> None:
        self._items[key] = (time.monotonic() + self.ttl_s, value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class RedisBackend:
    """Redis with SETEX; every call bounded by `timeout_s`."""

    def __init__(self, url: str, ttl_s: float, timeout_s: float) -> None:
        import redis.asyncio as redis

        self.ttl_s = ttl_s
        self.client = redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=None
        )

    async def get(self, key: str) -> str | None:
        value = await self.client.get(key)
        return value.decode() if isinstance(value, bytes) else value

    async def set(self, key: str, value: str) -> None:
        await self.client.set(key, value, ex=max(1, int(self.ttl_s)))


class ResponseCache:
    def __init__(self, backend: Backend, model: str, cooldown_s: float = 2.0) -> None:
        self.backend, self.model, self.cooldown_s = backend, model, cooldown_s
        self.stats = ResponseCacheStats()
        self._skip_until = 0.0
        self._pending: set[asyncio.Future] = set()  # stores in flight

    def key(self, request: Request) -> str | None:
        """The cache key, or None when this request must not be cached (not deterministic,
        opted out, or asking for logprobs, which a stored answer does not keep)."""
        skip = request.skip_response_cache or request.sampling.logprobs is not None
        if not request.sampling.deterministic or skip:
            self.stats.skipped += 1
            return None
        normalized = {
            "model": self.model,
            "prompt": request.prompt_ids,
            "max_tokens": request.max_tokens,
            "sampling": asdict(request.sampling),
        }
        digest = hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()
        return f"gateway:response:{digest}"

    async def get(self, key: str) -> CachedResponse | None:
        self.stats.queries += 1
        raw = await self._guarded("get", self.backend.get(key))
        if raw is None:
            return None
        self.stats.hits += 1
        return CachedResponse(**json.loads(raw))

    async def put(self, key: str, response: CachedResponse) -> None:
        await self._guarded("set", self.backend.set(key, json.dumps(asdict(response))))

    async def answer(self, request: Request) -> bool:
        """The pipeline's cache stage: True when `request` was answered from the cache (it is
        finished, and no engine sees it). On a miss the answer is stored once it is complete."""
        key = self.key(request)
        if key is None:
            return False
        cached = await self.get(key)
        if cached is not None:
            request.response_cache = "hit"
            request.finish_with(cached.text, cached.output_ids, cached.finish_reason)
            return True
        request.response_cache = "miss"
        request.add_done_callback(lambda r: self._store_later(key, r))
        return False

    def _store_later(self, key: str, request: Request) -> None:
        reason = request.finish_reason or "stop"  # (set: the request finished normally)
        response = CachedResponse(request.text, request.output_ids, reason)
        task = asyncio.ensure_future(self.put(key, response))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Finish the stores already started (at shutdown)."""
        await asyncio.gather(*self._pending)

    async def _guarded(self, what: str, call):
        if time.monotonic() < self._skip_until:
            call.close()  # never awaited: the backend is cooling down
            self.stats.errors += 1
            return None
        try:
            return await call
        except Exception as exc:  # any backend fault means "no cache", never a failed request
            self.stats.errors += 1
            self._skip_until = time.monotonic() + self.cooldown_s
            log.warning("response cache %s bypassed: %s: %s", what, type(exc).__name__, exc)
            return None
