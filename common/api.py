"""The OpenAI-compatible routes, shared by every step.

A handler reads the body, then, on a worker thread (parsing, chat templating and tokenizing a
large body take long enough to hold up every stream the event loop is serving), validates it,
refuses a prompt that cannot fit before tokenizing all of it, and tokenizes it. Back on the loop
it builds a Request and passes it to the step's pipeline (`Serving.submit`: the engine alone, or
response cache -> admission -> engine, as the step composes it). Then it either collects the
request's deltas into one response or streams them as server-sent events. Steps differ only in
what happens between submit and the deltas.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common import protocol
from common.config import ServerConfig
from common.errors import APIError
from common.protocol import GenerationRequest
from common.request import DeltaChannel, Request

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("gateway")
T = TypeVar("T")


@dataclass(frozen=True)
class EngineLoad:
    """What an engine holds right now. The engine is the one owner of where its requests are;
    whoever needs the counts (metrics, admission, readiness, the drain) asks it for this."""

    waiting: int = 0  # taken, not started (or preempted and waiting again), client still there
    waiting_tokens: int = 0  # the tokens those still have to prefill
    running: int = 0  # in the model's hands now

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running


class Engine(Protocol):
    async def submit(self, request: Request) -> None:
        """Take the request; its deltas will arrive on request.deltas(). May raise APIError."""

    def load(self) -> EngineLoad:
        """What it is holding now."""
        ...


class BackgroundEngine(Engine, Protocol):
    """An engine with a worker of its own, started and stopped by the step's lifespan."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


Submit = Callable[[Request], Awaitable[None]]  # a step's pipeline after validation


class Outcome(str, enum.Enum):
    """How an API request ended. Every request to a generation route gets exactly one."""

    SUCCESS = "success"
    CLIENT_ERROR = "client_error"  # 4xx: the request was wrong
    SERVER_ERROR = "server_error"  # 5xx, or a stream that broke
    REJECTED = "rejected"  # 429 / 503: valid, but the server would not take it now
    CANCELLED = "cancelled"  # the client went away first

    @classmethod
    def for_status(cls, status: int) -> Outcome:
        if status in (429, 503):
            return cls.REJECTED
        return cls.CLIENT_ERROR if 400 <= status < 500 else cls.SERVER_ERROR


class Observer:
    """Hooks around every generation request; this one does nothing. A step may watch."""

    def on_start(self, http: HTTPRequest, request: Request) -> None:
        """The request is valid and about to be submitted to the engine."""

    def on_end(self, http: HTTPRequest, outcome: Outcome, request: Request | None) -> None:
        """Called once per request; `request` is None when it failed before one was made."""


class Observers(Observer):
    """Several observers as one, called in order."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def on_start(self, http: HTTPRequest, request: Request) -> None:
        for observer in self.observers:
            observer.on_start(http, request)

    def on_end(self, http: HTTPRequest, outcome: Outcome, request: Request | None) -> None:
        for observer in self.observers:
            observer.on_end(http, outcome, request)


@dataclass
class Serving:
    """What the routes need from the step, set on app.state.serving by its lifespan."""

    config: ServerConfig
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    engine: Engine
    observer: Observer = field(default_factory=Observer)
    # After validation, the request's way to the engine: the engine alone unless a step
    # composes more in front of it (step 4's response cache, step 6's admission).
    pipeline: Submit | None = None

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id}

    async def submit(self, request: Request) -> None:
        await (self.pipeline or self.engine.submit)(request)

    def check_prompt(self, num_tokens: int, param: str, at_least: bool = False) -> None:
        """A 400 for a prompt of `num_tokens` (or, with at_least, of at least that many) that
        leaves no room in the context window for a single new token."""
        if num_tokens >= self.max_model_len:
            some = "at least " if at_least else ""
            raise APIError(
                f"this model's context window is {self.max_model_len} tokens; the prompt has "
                f"{some}{num_tokens}",
                param=param,
                code="context_length_exceeded",
            )

    def check_prompt_chars(self, num_chars: int, param: str) -> None:
        """Refuse, before tokenizing it, a prompt so long that it must be over the limit: no
        token spells more than `longest_token_chars` characters, so a text of n characters
        has at least n / that many tokens."""
        self.check_prompt(num_chars // longest_token_chars(self.tokenizer), param, at_least=True)

    def check_message_count(self, count: int) -> None:
        """Refuse `count` messages that must make too long a prompt: each one adds at least
        `tokens_per_message` tokens."""
        least = count * tokens_per_message(self.tokenizer)
        self.check_prompt(least, "messages", at_least=True)

    def make_request(
        self, prompt_ids: list[int], params: GenerationRequest, rid: str, prompt_param: str
    ) -> Request:
        """The request to submit, once the prompt fits; `prompt_param` names the prompt's field
        (messages or prompt) in errors."""
        if params.model != self.config.served_model_name:
            raise APIError(
                f"model '{params.model}' does not exist; this server serves "
                f"'{self.config.served_model_name}'",
                param="model",
                code="model_not_found",
            )
        self.check_prompt(len(prompt_ids), prompt_param)
        room = self.max_model_len - len(prompt_ids)
        max_tokens = params.max_new_tokens or min(self.config.default_max_tokens, room)
        if max_tokens > room:
            raise APIError(
                f"this model's context window is {self.max_model_len} tokens; the prompt has "
                f"{len(prompt_ids)} and max_tokens asks for {max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return Request(
            prompt_ids,
            params.sampling(),
            max_tokens,
            self.tokenizer,
            self.eos_token_ids,
            rid,
            channel=DeltaChannel(),
        )


@functools.cache
def tokens_per_message(tokenizer: PreTrainedTokenizerBase) -> int:
    """The fewest tokens the chat template adds for one more message, whatever its role: the
    tokens of a conversation with one more empty message, less those without it (0 for a
    template that may drop a message). SmolLM2's adds 4 or more (`<|im_start|>user\n...`)."""

    def count(messages: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer.encode(cast(str, text), add_special_tokens=False))

    first = [{"role": "user", "content": ""}]
    roles = ("system", "user", "assistant", "tool")
    added = [count([*first, {"role": role, "content": ""}]) - count(first) for role in roles]
    return max(0, min(added))


@functools.cache
def longest_token_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """An upper bound on the characters one token decodes to: the longest entry of the
    vocabulary (byte-level BPE writes one character per byte, and a character is a byte or
    more). 81 for SmolLM2's tokenizer."""
    return max(len(token) for token in tokenizer.get_vocab())


def serving(http: HTTPRequest) -> Serving:
    state = getattr(http.app.state, "serving", None)
    if state is None:
        raise APIError("the model is still loading", status=503, code="not_ready")
    return state


# The headers the API understands. The domain never sees HTTP: they become typed fields.
NO_CACHE = ("no-cache", "no-store")  # Cache-Control values that skip any response cache
QUEUE_TIMEOUT_HEADER = "x-queue-timeout"  # seconds this request may wait to start


def read_headers(http: HTTPRequest, request: Request) -> None:
    control = http.headers.get("cache-control", "").lower()
    request.skip_response_cache = any(word in control for word in NO_CACHE)
    raw = http.headers.get(QUEUE_TIMEOUT_HEADER)
    if raw is not None:
        request.queue_timeout_s = _positive_seconds(raw)


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise APIError(
            f"'{QUEUE_TIMEOUT_HEADER}' must be a positive number of seconds",
            param=QUEUE_TIMEOUT_HEADER,
        )
    return value


def usage(request: Request) -> dict:
    return protocol.usage(
        request.num_prompt_tokens, request.num_output_tokens, request.cached_prompt_tokens
    )


def response_headers(request: Request) -> dict[str, str]:
    return {"X-Cache": request.response_cache} if request.response_cache else {}


# ---------------------------------------------------------------- routes


async def chat_completions(http: HTTPRequest) -> Response:
    return await _generate(http, _prepare_chat)


async def completions(http: HTTPRequest) -> Response:
    return await _generate(http, _prepare_completion)


# Parsing, templating and tokenizing run here, never on the event loop. Two threads: a flood
# of large bodies waits its turn instead of taking every core from the model.
_PREPARE = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")


async def off_loop(fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, fn, *args)


async def _prepare_chat(http: HTTPRequest, state: Serving):
    parsed, prompt_ids = await off_loop(_tokenize_chat, await http.body(), state)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    request = state.make_request(prompt_ids, parsed, rid, prompt_param="messages")
    return request, parsed, _ChatFormat(rid, parsed)


def _tokenize_chat(body: bytes, state: Serving) -> tuple[protocol.ChatCompletionRequest, list]:
    """On a worker thread: count, parse, bound, template, bound again, tokenize; each bound
    refuses a prompt that must be too long before the next, costlier stage runs."""
    count = protocol.count_messages(body)
    if count is not None:  # before the full parse, which costs ~5 us a message
        state.check_message_count(count)
    parsed = protocol.parse_chat_request(body)
    messages = [message.as_dict() for message in parsed.messages]
    state.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
    text = cast(
        str,
        state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
    )
    state.check_prompt_chars(len(text), "messages")
    # As apply_chat_template(tokenize=True) does: the template writes the special tokens.
    return parsed, state.tokenizer.encode(text, add_special_tokens=False)


async def _prepare_completion(http: HTTPRequest, state: Serving):
    parsed, prompt_ids = await off_loop(_tokenize_completion, await http.body(), state)
    rid = f"cmpl-{uuid.uuid4().hex}"
    request = state.make_request(prompt_ids, parsed, rid, prompt_param="prompt")
    return request, parsed, _TextFormat(rid, parsed)


def _tokenize_completion(body: bytes, state: Serving) -> tuple[protocol.CompletionRequest, list]:
    parsed = protocol.parse_completion_request(body)
    if not isinstance(parsed.prompt, str):
        prompt_ids = [int(t) for t in parsed.prompt]
        if max(prompt_ids) >= len(state.tokenizer):
            raise APIError("'prompt' has token ids outside the vocabulary", param="prompt")
        return parsed, prompt_ids
    state.check_prompt_chars(len(parsed.prompt), "prompt")
    return parsed, state.tokenizer.encode(parsed.prompt, add_special_tokens=False)


async def _generate(http: HTTPRequest, prepare) -> Response:
    """Validate, submit, answer; report exactly one outcome to the observer."""
    arrival = time.monotonic()  # latencies count from here, body parsing included
    state, request = None, None
    try:
        state = serving(http)
        request, params, fmt = await prepare(http, state)
        request.arrival_time = arrival
        read_headers(http, request)
        state.observer.on_start(http, request)
        return await _respond(http, state, request, params, fmt)
    except ClientDisconnect:  # gone while still sending its body: nobody to answer
        if state is not None:
            state.observer.on_end(http, Outcome.CANCELLED, request)
        return Response(status_code=499)
    except APIError as exc:
        if state is not None:
            state.observer.on_end(http, Outcome.for_status(exc.status), request)
        raise
    except Exception:
        if state is not None:
            state.observer.on_end(http, Outcome.SERVER_ERROR, request)
        raise


async def models(http: HTTPRequest) -> Response:
    name = serving(http).config.served_model_name
    card = {"id": name, "object": "model", "created": 0, "owned_by": "llm-inference-gateway"}
    return JSONResponse({"object": "list", "data": [card]})


async def health(http: HTTPRequest) -> Response:
    serving(http)
    return JSONResponse({"status": "ok"})


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]


# ---------------------------------------------------------------- response shaping


class _ChatFormat:
    def __init__(self, rid: str, params: GenerationRequest) -> None:
        self.rid, self.model, self.kind = rid, params.model, "chat.completion.chunk"

    def whole(self, text: str, finish: str, use: dict) -> dict:
        return protocol.chat_response(self.rid, self.model, text, finish, use)

    def first_chunk(self) -> dict | None:
        return protocol.chat_chunk(self.rid, self.model, {"role": "assistant", "content": ""}, None)

    def chunk(self, text: str, finish: str | None) -> dict:
        delta = {"content": text} if text else {}
        return protocol.chat_chunk(self.rid, self.model, delta, finish)


class _TextFormat:
    def __init__(self, rid: str, params: GenerationRequest) -> None:
        self.rid, self.model, self.kind = rid, params.model, "text_completion"

    def whole(self, text: str, finish: str, use: dict) -> dict:
        return protocol.completion_response(self.rid, self.model, text, finish, use)

    def first_chunk(self) -> dict | None:
        return None

    def chunk(self, text: str, finish: str | None) -> dict:
        return protocol.completion_response(self.rid, self.model, text, finish)


async def _respond(http, state: Serving, request: Request, params, fmt) -> Response:
    await state.submit(request)
    if params.stream:
        events = _sse(http, state, request, fmt, params.include_usage)
        headers = {**_SSE_HEADERS, **response_headers(request)}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    result = await _until_done_or_disconnect(http, request, _collect(request))
    if result is None:  # nobody is listening any more
        state.observer.on_end(http, Outcome.CANCELLED, request)
        return Response(status_code=499)
    text, finish = result
    use = usage(request)
    state.observer.on_end(http, Outcome.SUCCESS, request)
    return JSONResponse(fmt.whole(text, finish, use), headers=response_headers(request))


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _collect(request: Request) -> tuple[str, str]:
    parts, finish = [], "stop"
    async for delta in request.deltas():
        parts.append(delta.text)
        finish = delta.finish_reason or finish
    return "".join(parts), finish


async def _until_done_or_disconnect(http: HTTPRequest, request: Request, work):
    """Await `work`; if the client hangs up first, cancel the request and return None."""
    return await until_disconnect(http, work, on_disconnect=request.cancel)


async def until_disconnect(
    http: HTTPRequest, work: Awaitable[T], on_disconnect: Callable[[], None] | None = None
) -> T | None:
    """Await `work`; if the client hangs up first, call `on_disconnect`, cancel `work` and
    return None. (Step 8's router awaits a replica's answer the same way.)"""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(http.receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        watcher.cancel()
        if not task.done():
            if on_disconnect is not None:
                on_disconnect()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait_disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _sse(http, state: Serving, request: Request, fmt, include_usage: bool):
    outcome = Outcome.CANCELLED  # unless the stream gets to its end
    try:
        first = fmt.first_chunk()
        if first is not None:
            yield sse_event(first)
        async for delta in request.deltas():
            if delta.text or delta.finish_reason:
                yield sse_event(fmt.chunk(delta.text, delta.finish_reason))
        if include_usage:
            use = usage(request)
            yield sse_event(protocol.usage_chunk(fmt.kind, fmt.rid, fmt.model, use))
        yield "data: [DONE]\n\n"
        outcome = Outcome.SUCCESS
    except APIError as exc:  # e.g. a deadline passed while queued: headers are already sent
        outcome = Outcome.for_status(exc.status)
        yield sse_event(exc.body())
    except Exception as exc:  # report in-band, as OpenAI does
        outcome = Outcome.SERVER_ERROR
        log.exception("stream %s failed", request.request_id)
        yield sse_event(APIError(f"generation failed: {type(exc).__name__}", 500).body())
    finally:
        request.cancel()  # a no-op when finished; stops the worker when the client left
        state.observer.on_end(http, outcome, request)


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
