"""Step 3: batching. The worker runs several waiting requests through one forward pass.

New since step 2: the single worker takes up to max_batch_size requests at a time (waiting at most
max_wait_ms to fill the batch) and decodes them together, left-padded. The queue is step 2's.
Run: python -m step3_batching
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from common.api import Serving
from common.app import create_app, serve
from common.model import load_model
from common.timeline import TimelineConfig
from step2_queue.queue import RequestQueue
from step2_queue.server import Config as QueueConfig
from step3_batching.batcher import BatchingConfig, BatchingEngine


@dataclass(frozen=True)
class Config(TimelineConfig, BatchingConfig, QueueConfig):
    """Step 3: batching. Step 2's queue, and a worker that runs several requests at once
    (every batch's forward passes recorded on the timeline, GET /debug/timeline)."""


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        queue = RequestQueue(config.max_queue_size)
        engine = BatchingEngine(lm, queue, config, timeline=config)
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
