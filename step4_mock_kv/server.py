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

from common.api import BackgroundEngine, Serving
from common.app import create_app, serve
from common.config import knob
from common.model import LoadedModel, load_model
from step2_queue.queue import RequestQueue
from step3_batching.server import Config as BatchingConfig
from step4_mock_kv.prefix_cache import MockPrefixCache
from step4_mock_kv.prefix_prefill import PrefixBatchingEngine
from step4_mock_kv.response_cache import (
    CachingEngine,
    ResponseCache,
    ResponseCacheConfig,
    make_response_cache,
)


@dataclass(frozen=True)
class Config(ResponseCacheConfig, BatchingConfig):
    """Step 4: step 3's batching with a prefix cache, and a cache of whole responses."""

    block_size: int = knob(16, "tokens per prefix block")
    prefix_cache_mb: int = knob(512, "byte budget of the prefix cache, in MiB")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1 or self.prefix_cache_mb < 0:
            raise ValueError("block_size must be >= 1 and prefix_cache_mb >= 0")


def build_engine(
    config: Config, lm: LoadedModel
) -> tuple[BackgroundEngine, MockPrefixCache, ResponseCache | None]:
    """Step 3's queue and batcher, prefilling through the prefix cache, behind the response
    cache. Returns the engine to serve with, and both caches."""
    prefix_cache = MockPrefixCache(config.block_size, config.prefix_cache_mb << 20)
    queue = RequestQueue(config.max_queue_size)
    engine: BackgroundEngine = PrefixBatchingEngine(lm, queue, config, prefix_cache)
    response_cache = make_response_cache(config, config.served_model_name)
    if response_cache is not None:
        engine = CachingEngine(engine, response_cache)
    return engine, prefix_cache, response_cache


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        engine, _, _ = build_engine(config, lm)
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
