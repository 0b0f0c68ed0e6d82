"""Step 4: a mock KV cache for shared prompt prefixes, and a cache of whole hot responses.

New since step 3: each prompt reuses the keys and values of its longest cached prefix and
prefills only the rest; a repeated deterministic request is answered from the response cache
(in-process, or Redis when GATEWAY_REDIS_URL is set) without touching the model.
Run: python -m step4_mock_kv
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from common.api import Serving
from common.app import create_app, serve
from common.model import load_model
from step2_queue.queue import RequestQueue
from step3_batching.server import Config as BatchingConfig
from step4_mock_kv.prefix_prefill import PrefixBatchingEngine
from step4_mock_kv.prefix_cache import MockPrefixCache
from step4_mock_kv.response_cache import (
    CachingEngine,
    MemoryBackend,
    RedisBackend,
    ResponseCache,
)


@dataclass(frozen=True)
class Config(BatchingConfig):
    block_size: int = 16  # tokens per prefix block
    prefix_cache_mb: int = 512  # byte budget of the prefix cache
    response_cache: bool = True
    response_cache_entries: int = 1024  # in-process backend only
    response_cache_ttl_s: float = 300.0
    redis_url: str = ""  # e.g. redis://127.0.0.1:6379/0; empty means in-process
    redis_timeout_s: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or self.prefix_cache_mb < 0:
            raise ValueError("block_size must be >= 1 and prefix_cache_mb >= 0")


def make_response_cache(config: Config) -> ResponseCache:
    if config.redis_url:
        backend = RedisBackend(
            config.redis_url, config.response_cache_ttl_s, config.redis_timeout_s
        )
    else:
        backend = MemoryBackend(config.response_cache_entries, config.response_cache_ttl_s)
    return ResponseCache(backend, config.served_model_name)


def build_engine(
    config: Config, lm
) -> tuple[PrefixBatchingEngine | CachingEngine, MockPrefixCache]:
    prefix_cache = MockPrefixCache(config.block_size, config.prefix_cache_mb << 20)
    queue = RequestQueue(config.max_queue_size)
    engine = PrefixBatchingEngine(
        lm, queue, config.max_batch_size, config.max_wait_ms, prefix_cache
    )
    if config.response_cache:
        engine = CachingEngine(engine, make_response_cache(config))
    return engine, prefix_cache


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        engine, _ = build_engine(config, lm)
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
