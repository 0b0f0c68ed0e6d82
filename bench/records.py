"""One record per HTTP attempt, measured on the client, and the SSE parsing that fills it.

Times are seconds. TTFT is measured to the first chunk that carries text, not to the empty
role chunk that a server may send before it has generated anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

REJECTION_STATUSES = (429, 503)


@dataclass
class Record:
    request_id: int  # the logical request; retries share it
    attempt: int  # 0 for the first try
    prompt_id: str
    start: float  # wall clock (time.time) when the request was sent
    status: int  # HTTP status; 0 when no response came (connection refused, timeout)
    e2e_s: float | None = None
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between text chunks
    output_tokens: int = 0
    prompt_tokens: int = 0  # usage.prompt_tokens of the last chunk; 0 when none came
    finish_reason: str | None = None  # "length" (ran to max_tokens), "stop", ...
    request_class: str = ""  # the workload's class of this request; "" without classes
    retry_after_s: float | None = None
    error: str | None = None
    cut_off: bool = False  # still in flight when the level ended: neither success nor error

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def rejected(self) -> bool:
        return self.status in REJECTION_STATUSES

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: the decode speed one client sees."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        return cls(**data)


class StreamParser:
    """Fills a record from SSE lines as they arrive, each with the monotonic time it came.

    Incremental so that a stream cut off at the end of a level still records what it got.
    Output tokens come from the final usage chunk when the server sends one, else one per chunk.
    """

    def __init__(self, record: Record, sent_at: float) -> None:
        self.record, self.sent_at = record, sent_at
        self.text_times: list[float] = []
        self.usage_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.finish_reason: str | None = None
        self.done = False  # [DONE] arrived
        self.finished = False  # a choice carried its finish_reason: the answer is whole

    def feed(self, arrived: float, line: str) -> bool:
        """Take one line; True once the stream is over ([DONE] or an in-band error)."""
        if not line.startswith("data:"):
            return False
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            self.done = True
            return True
        chunk = json.loads(payload)
        if "error" in chunk:
            self.record.error = str(chunk["error"].get("message", chunk["error"]))
            return True
        if chunk.get("usage"):
            self.usage_tokens = chunk["usage"].get("completion_tokens")
            self.prompt_tokens = chunk["usage"].get("prompt_tokens")
        reasons = [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
        if reasons:
            self.finished, self.finish_reason = True, reasons[0]
        if any(_chunk_text(choice) for choice in chunk.get("choices", [])):
            self.text_times.append(arrived)
        return False

    def close(self) -> Record:
        record, times = self.record, self.text_times
        if times:
            record.ttft_s = times[0] - self.sent_at
            record.itl_s = [b - a for a, b in zip(times, times[1:], strict=False)]
        record.output_tokens = self.usage_tokens if self.usage_tokens is not None else len(times)
        record.prompt_tokens = self.prompt_tokens or 0
        record.finish_reason = self.finish_reason
        # transformers serve ends its streams after the finish_reason chunk, without [DONE].
        if not (self.done or self.finished) and record.error is None:
            record.error = "stream ended before [DONE] or a finish_reason"
        return record


def parse_stream(record: Record, lines: Iterable[tuple[float, str]], sent_at: float) -> Record:
    """Fill `record` from a whole stream of (arrival time, line) pairs."""
    parser = StreamParser(record, sent_at)
    for arrived, line in lines:
        if parser.feed(arrived, line):
            break
    return parser.close()


def _chunk_text(choice: dict) -> str:
    # Chat chunks carry delta.content, completion chunks carry text.
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def retry_after_seconds(header: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare for rate limits and is ignored."""
    if header is None:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        return None


def backoff_delay(attempt: int, retry_after: float, base: float = 0.5, cap: float = 8.0) -> float:
    """Wait at least what the server asked, doubling per attempt, never more than `cap` s."""
    return min(cap, max(retry_after, base * 2**attempt))
