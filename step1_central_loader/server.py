"""Step 1: load the model once at startup and keep the event loop free.

New since step 0: the weights are loaded in the lifespan, before the first request, and every
generation runs on a worker thread. Run: python -m step1_central_loader
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from starlette.applications import Starlette

from common.api import Serving
from common.app import create_app, serve
from common.config import ServerConfig
from common.model import load_model
from step1_central_loader.central_loader import CentralLoaderEngine


def build_app(config: ServerConfig) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        lm = load_model(config)
        engine = CentralLoaderEngine(lm)
        app.state.serving = Serving(config, lm.tokenizer, lm.max_model_len, engine)
        yield

    return create_app(lifespan)


def main() -> None:
    serve(build_app)


if __name__ == "__main__":
    main()
