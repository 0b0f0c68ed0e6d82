"""Structured logs: one JSON line per finished request, a periodic stats line, X-Request-Id.

Log records carry their data in `extra={"fields": {...}}`; the JSON formatter writes them as
top-level keys, the text formatter as `key=value` pairs, so one call serves both formats.
Prompt text is never logged unless `log_prompts` is on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass

from common.api import Outcome
from common.config import ConfigPart, knob
from common.request import Request

log = logging.getLogger("gateway.requests")
stats_log = logging.getLogger("gateway.stats")

REQUEST_ID = "x-request-id"


@dataclass(frozen=True)
class LogConfig(ConfigPart):
    log_format: str = knob("text", "text | json (one JSON object per line)")
    log_prompts: bool = knob(False, "put prompt token ids in request log lines")
    stats_interval_s: float = knob(10.0, "seconds between two stats log lines")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log_format not in ("text", "json") or self.stats_interval_s <= 0:
            raise ValueError("log_format must be text or json; stats_interval_s > 0")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        return f"{super().format(record)} {pairs}".rstrip()


def use_format(kind: str) -> None:
    """Switch every handler of the root and uvicorn loggers to the chosen format."""
    formatter = JsonFormatter() if kind == "json" else TextFormatter()
    for name in ("", "uvicorn", "uvicorn.access", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter)


def request_fields(http, outcome: Outcome, request: Request | None, log_prompts: bool) -> dict:
    fields = {"request_id": http.headers.get(REQUEST_ID), "outcome": outcome.value}
    if request is None:
        return fields
    first = request.first_token_time
    times = request.token_times
    fields.update(
        completion_id=request.request_id,
        finish_reason=request.finish_reason,
        prompt_tokens=request.num_prompt_tokens,
        cached_prompt_tokens=request.cached_prompt_tokens,
        output_tokens=sum(c.num_output_tokens for c in request.siblings),  # every choice
        response_cache=request.response_cache,
        queue_wait_s=_round(request.queue_wait_s),
        ttft_s=_round(first - request.arrival_time if first else None),
        tpot_s=_round((times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None),
        e2e_s=_round(time.monotonic() - request.arrival_time),
    )
    if log_prompts:
        fields["prompt"] = request.prompt_ids
    return fields


def _round(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def log_request(http, outcome: Outcome, request: Request | None, log_prompts: bool) -> None:
    log.info("request", extra={"fields": request_fields(http, outcome, request, log_prompts)})


async def log_stats_every(interval_s: float, snapshot) -> None:
    """Every interval: tokens/s since the last line, running, waiting, cache hit rates."""
    last_tokens, last_time = snapshot()["generation_tokens"], time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now, current = time.monotonic(), snapshot()
        rate = (current["generation_tokens"] - last_tokens) / (now - last_time)
        last_tokens, last_time = current["generation_tokens"], now
        stats_log.info("stats", extra={"fields": {**current, "tokens_per_s": round(rate, 1)}})


class RequestIdMiddleware:
    """Accept the client's X-Request-Id or make one; pass it down and send it back."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = list(scope["headers"])
        rid = next((v for k, v in headers if k == REQUEST_ID.encode()), None)
        if rid is None:
            rid = uuid.uuid4().hex.encode()
            headers.append((REQUEST_ID.encode(), rid))
        scope = {**scope, "headers": headers}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"x-request-id", rid)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
