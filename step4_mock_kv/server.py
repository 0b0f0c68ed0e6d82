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

from common.api import BackgroundEngine, Serving, Submit
from common.app import create_app, serve
from common.model import LoadedModel, load_model
from common.request import Request
from step2_queue.queue import RequestQueue
from step3_batching.server import Config as BatchingConfig
from step4_mock_kv.prefix_cache import MockPrefixCache, PrefixCacheConfig
from step4_mock_kv.prefix_prefill import PrefixBatchingEngine
from step4_mock_kv.response_cache import ResponseCache, ResponseCacheConfig, make_response_cache


@dataclass(frozen=True)
class Config(ResponseCacheConfig, PrefixCacheConfig, BatchingConfig):
    """Step 4: step 3's batching with a prefix cache, and a cache of whole responses."""


def build_engine(
    config: Config, lm: LoadedModel
) -> tuple[PrefixBatchingEngine, MockPrefixCache, ResponseCache | None]:
    """Step 3's queue and batcher, prefilling through the prefix cache; and the response cache
    that goes in front of them. Returns the engine and both caches."""
    prefix_cache = MockPrefixCache(config.block_size, config.prefix_cache_mb << 20)
    queue = RequestQueue(config.max_queue_size)
    engine = PrefixBatchingEngine(lm, queue, config, prefix_cache, timeline=config)
    return engine, prefix_cache, make_response_cache(config, config.served_model_name)


def pipeline(response_cache: ResponseCache | None, engine: BackgroundEngine) -> Submit:
    """A valid request's way: the response cache, then (on a miss) the engine."""

    async def submit(request: Request) -> None:
        if response_cache is not None and await response_cache.answer(request):
            return
        await engine.submit(request)

    return submit


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        engine, _, response_cache = build_engine(config, lm)
        engine.start()
        submit = pipeline(response_cache, engine)
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine, pipeline=submit)
        yield
        if response_cache is not None:
            await response_cache.flush()
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
