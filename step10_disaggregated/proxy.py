"""Step 9's proxy, twice: a request goes to the prefill pool for its first token and KV blocks,
then to the decode pool, which streams the answer.

The two phases carry the fields of vLLM's disaggregation proxy, so one maps onto the other:

1. prefill: the client's body with `max_tokens` 1, one choice, not streamed, and
   `kv_transfer_params: {"do_remote_decode": true}`; the prefill engine answers with the
   `kv_transfer_params` the decode engine needs, to which the proxy adds `remote_host` and
   `remote_port` (the prefill engine it reached);
2. decode: the client's body unchanged but for those `kv_transfer_params`; its answer (streamed
   or whole, with every choice, usage, logprobs) is the client's, relayed by step 9's proxy.

A prefill that fails (no prefill engine ready, one that breaks off, an answer without params):
the decode engine recomputes the prompt (`kv_transfer_failure=recompute`, the default) or the
client gets a 502 (`fail`). A prefill that refuses the request as bad (a 4xx) is the client's
answer. Each pool has its own routing (cache-aware on the prefill pool: that is where a prompt's
prefix is computed).

A short prompt skips the prefill pool (`local_prefill_chars`): its prefill is a small chunk in
the decode engine's batch, cheaper than a round trip and a transfer, and it cannot hold the
decoding streams up for long. Only long prompts, whose chunks would, are handed over. NVIDIA
Dynamo calls this conditional disaggregation (a length threshold in tokens); the router counts
characters, as its prefix routing does, so that it needs no tokenizer.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from prometheus_client.core import CounterMetricFamily
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from common.api import EngineLoad
from common.errors import APIError
from step9_router.proxy import UPSTREAM_HEADER, Proxy, RequestLog
from step10_disaggregated.kv_connector import TransferParams

log = logging.getLogger("gateway.requests")


class PhaseLog(RequestLog):
    """The prefill phase's record: its engine's count only; the request's one outcome, TTFT
    and log line are the decode phase's."""

    def __init__(self) -> None:
        self.upstream, self.attempts, self.first_token_time = None, 0, None
        self.ended = False

    def end(self, outcome, status: int) -> None:
        if not self.ended and self.upstream is not None:
            self.upstream.finish(outcome)
        self.ended = True


class DisaggProxy:
    def __init__(
        self, prefill: Proxy, decode: Proxy, failure_policy: str, local_prefill_chars: int = 0
    ) -> None:
        self.prefill, self.decode, self.failure_policy = prefill, decode, failure_policy
        self.local_prefill_chars = local_prefill_chars
        self.prefills: Counter[str] = Counter()  # where prompts were prefilled: remote, local
        # Refusals, by reason: the door's (the drain) and the decode pool's; a prefill pool
        # that refuses is a prefill failure (the policy's), not the client's refusal.
        self.reasons: Counter[str] = decode.reasons

    # What step 5's gauges and step 6's lifecycle ask, for both pools together.

    def admit(self) -> None:
        self.decode.admit()

    def load(self) -> EngineLoad:
        return EngineLoad(running=self.prefill.load().running + self.decode.load().running)

    def in_flight(self) -> int:
        return self.load().in_flight

    def saturated(self) -> bool:
        """A pool without a ready engine: nothing can be served (readiness says so)."""
        return not (self.prefill.pool.ready() and self.decode.pool.ready())

    async def get(self, path: str, body: bytes | None = None) -> Response:
        return await self.decode.get(path, body)

    async def forward(
        self, http: HTTPRequest, path: str, body: bytes, prompt: str, done: RequestLog
    ) -> Response:
        if len(prompt) <= self.local_prefill_chars:
            self.prefills["local"] += 1
            return await self.decode.forward(http, path, body, prompt, done)
        self.prefills["remote"] += 1
        request = json.loads(body)
        params = await self.prefill_phase(http, path, request, prompt)
        if isinstance(params, Response):
            return params
        decode_body = json.dumps({**request, "kv_transfer_params": params}).encode()
        return await self.decode.forward(http, path, decode_body, prompt, done)

    async def prefill_phase(
        self, http: HTTPRequest, path: str, request: dict, prompt: str
    ) -> TransferParams | Response:
        """The decode engine's kv_transfer_params ({} to recompute), or the answer to give
        the client instead (a refusal of the request as bad)."""
        body = json.dumps(prefill_body(request)).encode()
        try:
            answer = await self.prefill.forward(http, path, body, prompt, PhaseLog())
        except APIError as exc:
            return self.prefill_failed(f"{exc.status} {exc.message}")
        if 400 <= answer.status_code < 500 and answer.status_code != 429:
            return answer  # the request itself is bad: the decode engine would say the same
        params = _params(answer)
        if params is None:
            return self.prefill_failed(f"answer {answer.status_code} without kv_transfer_params")
        host, _, port = answer.headers.get(UPSTREAM_HEADER, "").rpartition(":")
        return {**params, "remote_host": host, "remote_port": port}

    def prefill_failed(self, why: str) -> TransferParams:
        if self.failure_policy == "fail":
            raise APIError(f"the prefill failed: {why}", 502, code="prefill_failed")
        log.warning("prefill failed (%s): the decode engine computes the prompt", why)
        return {}


class PrefillCollector:
    """gateway_disagg_prefills_total{where}: prompts handed over (remote) or prefilled by the
    decode engine (local, shorter than local_prefill_chars)."""

    def __init__(self, proxy: DisaggProxy) -> None:
        self.proxy = proxy

    def collect(self):
        family = CounterMetricFamily(
            "gateway_disagg_prefills", "Prompts prefilled, by where.", labels=["where"]
        )
        for where in ("local", "remote"):
            family.add_metric([where], self.proxy.prefills[where])
        yield family


def prefill_body(request: dict) -> dict:
    """The client's request as the prefill phase sends it: one token of one choice, whole."""
    body = {k: v for k, v in request.items() if k not in ("stream_options", "n")}
    body.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True})
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    return body


def _params(answer: Response) -> TransferParams | None:
    if answer.status_code != 200:
        return None
    try:
        params = json.loads(bytes(answer.body)).get("kv_transfer_params")
    except (ValueError, AttributeError):
        return None
    return params if isinstance(params, dict) else None
