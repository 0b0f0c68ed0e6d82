"""Step 10's engine: step 8's server with the disaggregated engine, its KV routes and counters.

The same process serves either pool (prefill or decode): which part it plays for a request is
said by the request's kv_transfer_params (engine.py). New routes: POST /v1/kv/fetch and
/v1/kv/release, the prefill side of the HTTP connector (http_connector.py).
Run: python -m step10_disaggregated.engine_server
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from step6_backpressure.lifecycle import Lifecycle, serve_gracefully
from step7_real_kv.engine import PagedEngine
from step8_speculative import server as step8
from step10_disaggregated.engine import DisaggConfig, DisaggEngine, TransferCollector
from step10_disaggregated.http_connector import HttpConnector, fetch_route, release_route
from step10_disaggregated.transfer_middleware import KVTransferMiddleware


@dataclass(frozen=True)
class Config(DisaggConfig, step8.Config):
    """Step 10's engine: step 8's knobs, its engine id, the lease and the failure policy."""


class DisaggEngineWithHttp(DisaggEngine):
    """The disaggregated engine, fetching from other processes over HTTP."""

    def __init__(self, lm, config: DisaggConfig) -> None:
        super().__init__(lm, config, HttpConnector(via=config.kv_transport))


class Server(step8.Server):
    """Step 8's composition, with the disaggregated engine, its routes and its counters."""

    engine_class = DisaggEngineWithHttp  # type: ignore[assignment]  # (lm, config) all the same

    def collectors(self, engine: PagedEngine) -> list[Collector]:
        return [*super().collectors(engine), TransferCollector(cast(DisaggEngine, engine))]

    def routes(self) -> list[Route]:
        return [
            *super().routes(),  # step 8's page: the leases and blocks moved show in its pool
            Route("/v1/kv/fetch", fetch_route, methods=["POST"]),
            Route("/v1/kv/release", release_route, methods=["POST"]),
        ]

    def middleware(self) -> list[Middleware]:
        # Inside the body limit: it reads the body.
        return [*super().middleware(), Middleware(KVTransferMiddleware)]


def build_app(config: Config, lifecycle: Lifecycle | None = None) -> Starlette:
    return Server(config, lifecycle).app()


def main() -> None:
    serve_gracefully(build_app, Config)


if __name__ == "__main__":
    main()
