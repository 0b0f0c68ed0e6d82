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
from common.config import knob
from common.model import load_model
from step2_queue.queue import RequestQueue
from step2_queue.server import Config as QueueConfig
from step3_batching.batcher import BatchingEngine


@dataclass(frozen=True)
class Config(QueueConfig):
    """Step 3: batching. Step 2's queue, and a worker that runs several requests at once."""

    max_batch_size: int = knob(16, "rows in one forward pass")
    max_wait_ms: float = knob(100.0, "how long the worker waits to fill a batch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_size < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms >= 0")


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        queue = RequestQueue(config.max_queue_size)
        engine = BatchingEngine(lm, queue, config)
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
