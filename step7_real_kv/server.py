"""Step 7, the full server: continuous batching over a paged KV cache, with prefix caching.

New since step 6: the serving engine. The batch is rebuilt every iteration (finished sequences
leave, new ones join, long prompts are prefilled in chunks beside the decodes), keys and values
live in a preallocated pool of fixed-size blocks, and full blocks are shared between prompts with
the same prefix. Everything around the engine is step 6's: response cache, metrics and logs,
admission (which now also counts free KV blocks), deadlines, drain. Run: python -m step7_real_kv
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette

from common.model import LoadedModel
from step2_queue.queue import RequestQueue
from step4_mock_kv.response_cache import CachingEngine
from step4_mock_kv.server import make_response_cache
from step6_backpressure.lifecycle import Lifecycle
from step6_backpressure.server import Config as BackpressureConfig
from step6_backpressure.server import build_app as build_backpressure_app
from step6_backpressure.server import serve_gracefully
from step7_real_kv.kv_admission import KVAdmission
from step7_real_kv.engine import PagedEngine


@dataclass(frozen=True)
class Config(BackpressureConfig):
    # block_size (16) comes from step 4: here it is the token slots per KV block.
    num_kv_blocks: int = 2048  # blocks in the pool: 32768 tokens, 720 KiB a block in float32
    max_num_batched_tokens: int = 256  # new tokens per iteration (decodes + prefill chunks)
    max_num_seqs: int = 64  # sequences running at once

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.block_size, self.num_kv_blocks, self.max_num_seqs) < 1:
            raise ValueError("block_size, num_kv_blocks and max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


def build_paged_engine(config: Config, lm: LoadedModel):
    """The paged engine, behind step 4's response cache; its block manager is the prefix cache."""
    engine = PagedEngine(
        lm, RequestQueue(config.max_queue_size), config.block_size, config.num_kv_blocks,
        config.max_num_batched_tokens, config.max_num_seqs,
    )  # fmt: skip
    served = CachingEngine(engine, make_response_cache(config)) if config.response_cache else engine
    return served, engine.blocks, KVCollector(engine)


class KVCollector:
    """gateway_kv_blocks_{used,total} and gateway_preemptions_total, read at scrape time."""

    def __init__(self, engine: PagedEngine) -> None:
        self.engine = engine

    def collect(self):
        blocks = self.engine.blocks
        yield GaugeMetricFamily(
            "gateway_kv_blocks_total", "Blocks in the KV pool.", value=blocks.num_blocks
        )
        yield GaugeMetricFamily(
            "gateway_kv_blocks_used",
            "Blocks held by sequences.",
            value=blocks.num_blocks - blocks.num_free,
        )
        yield CounterMetricFamily(
            "gateway_preemptions",
            "Sequences preempted for blocks.",
            value=self.engine.scheduler.num_preemptions,
        )


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    return build_backpressure_app(
        config, lifecycle, build=build_paged_engine, admission=KVAdmission
    )


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
