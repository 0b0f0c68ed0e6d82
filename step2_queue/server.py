"""Step 2: a request queue in front of one model worker.

New since step 1: handlers enqueue requests instead of each running the model on its own thread;
a single worker serves them in FIFO order. A full queue answers 429 at once.
Run: python -m step2_queue
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette

from common.api import Serving
from common.app import create_app, serve
from common.config import ServerConfig
from common.model import load_model
from step2_queue.queue import QueueConfig, QueueEngine, RequestQueue


@dataclass(frozen=True)
class Config(QueueConfig, ServerConfig):
    """Step 2: a bounded request queue in front of one model worker."""


def build_app(config: Config) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        engine = QueueEngine(lm, RequestQueue(config.max_queue_size))
        engine.start()
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield
        await engine.stop()

    return create_app(lifespan)


def main() -> None:
    serve(build_app, Config)


if __name__ == "__main__":
    main()
