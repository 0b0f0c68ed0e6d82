"""Step 8: speculative decoding. Step 7's server, its engine guessing ahead and checking.

New since step 7: before each iteration, every decoding sequence gets a draft of up to k
tokens looked up in its own prompt and output (prompt lookup); the draft is verified in the same
forward pass as everyone else's work, and the longest prefix the model agrees with is kept,
plus one token of the model's own: greedy answers stay exactly step 7's, sampled ones keep the
model's distribution. Everything else is step 7's. Run: python -m step8_speculative
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.routing import Route

from step6_backpressure.lifecycle import Lifecycle, serve_gracefully
from step7_real_kv import server as step7
from step7_real_kv.engine import PagedEngine
from step8_speculative import live
from step8_speculative.engine import SpecCollector, SpeculativeConfig, SpeculativeEngine


@dataclass(frozen=True)
class Config(SpeculativeConfig, step7.Config):
    """Step 8: step 7's knobs, and the proposer's (k, n-gram sizes) and where it stops."""


class Server(step7.Server):
    """Step 7's composition, with the speculative engine and its counters."""

    engine_class = SpeculativeEngine  # step 7's engine, with a proposer and verify

    def collectors(self, engine: PagedEngine) -> list[Collector]:
        return [*super().collectors(engine), SpecCollector(cast(SpeculativeEngine, engine))]

    def live_routes(self) -> list[Route]:
        return live.routes()  # step 7's page, with the drafts and their acceptance


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    return Server(config, lifecycle).app()


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
