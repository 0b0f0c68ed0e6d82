"""Step 7: continuous batching over a paged KV cache, with automatic prefix caching.

New since step 3: the batch is rebuilt every iteration (finished sequences leave, new ones join,
long prompts are prefilled in chunks beside the decodes), keys and values live in a preallocated
pool of fixed-size blocks, and full blocks are shared between prompts with the same prefix.
Run: python -m step7_real_kv
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
from step7_real_kv.engine import PagedEngine


@dataclass(frozen=True)
class Config(BatchingConfig):
    block_size: int = 16  # token slots per KV block
    num_kv_blocks: int = 2048  # blocks in the pool: 32768 tokens, 720 KiB a block in float32
    max_num_batched_tokens: int = 256  # new tokens per iteration (decodes + prefill chunks)
    max_num_seqs: int = 64  # sequences running at once

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.block_size, self.num_kv_blocks, self.max_num_seqs) < 1:
            raise ValueError("block_size, num_kv_blocks and max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        engine = PagedEngine(
            lm,
            RequestQueue(config.max_queue_size),
            config.block_size,
            config.num_kv_blocks,
            config.max_num_batched_tokens,
            config.max_num_seqs,
        )
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
