"""Step 0, the baseline: the model is loaded from disk inside every request, then dropped.

Only the tokenizer is loaded at startup, because the API needs it to validate prompts before any
generation starts. Run: python -m step0_bruteforce
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from starlette.applications import Starlette

from common.api import Serving
from common.app import create_app, serve
from common.config import ServerConfig
from common.model import load_tokenizer, read_max_model_len
from step0_bruteforce.bruteforce import BruteForceEngine


def build_app(config: ServerConfig) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        tokenizer = load_tokenizer(config.model_path)
        engine = BruteForceEngine(config, tokenizer)
        app.state.serving = Serving(
            config, tokenizer, read_max_model_len(config.model_path), engine
        )
        yield

    return create_app(lifespan)


def main() -> None:
    serve(build_app)


if __name__ == "__main__":
    main()
