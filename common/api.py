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
import dataclasses
import enum
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from starlette.requests import ClientDisconnect
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common import protocol
from common.config import ServerConfig
from common.errors import APIError
from common.formats import ChatFormat, Choice, TextFormat, token_text
from common.grammar import grammars_for, json_grammar
from common.protocol import GenerationRequest
from common.request import Delta, DeltaChannel, Request
from common.timeline import trace
from common.tools import tool_grammar, with_tools

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

    def __post_init__(self) -> None:
        # What validating a request needs of the tokenizer, worked out now, before the server
        # is ready: each holds the GIL for a good tenth of a second, which the first request
        # would otherwise spend while other requests' tokens wait.
        longest_token_chars(self.tokenizer)
        tokens_per_message(self.tokenizer)
        _ = grammars_for(self.tokenizer).ll_tokenizer

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
        self,
        prompt_ids: list[int],
        params: GenerationRequest,
        rid: str,
        prompt_param: str,
        **choice: Any,
    ) -> Request:
        """One choice of the request to submit, once the prompt fits; `prompt_param` names the
        prompt's field (messages or prompt) in errors; `choice`: its index, channel, grammar
        (and the grammar's constraint)."""
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
        index = choice.get("index", 0)
        sampling = dataclasses.replace(params.sampling(), grammar=choice.get("grammar"))
        if sampling.seed is not None and index:  # choice i: seed + i, within a seed's range
            sampling = dataclasses.replace(sampling, seed=(sampling.seed + index) % 2**63)
        return Request(
            prompt_ids,
            sampling,
            max_tokens,
            self.tokenizer,
            self.eos_token_ids,
            rid,
            channel=choice.get("channel") or DeltaChannel(),
            constraint=choice.get("constraint"),
            index=index,
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
    """For the whole API request: the prompt once, the tokens of every choice."""
    generated = sum(choice.num_output_tokens for choice in request.siblings)
    return protocol.usage(request.num_prompt_tokens, generated, request.cached_prompt_tokens)


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
    parsed, prompt_ids, grammar = await off_loop(_tokenize_chat, await http.body(), state)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    choices = make_choices(state, prompt_ids, parsed, rid, "messages", grammar)
    return choices, parsed, ChatFormat(rid, parsed, state.tokenizer)


def _tokenize_chat(body: bytes, state: Serving):
    """On a worker thread: count, parse, bound, template, bound again, tokenize; each bound
    refuses a prompt that must be too long before the next, costlier stage runs. Then the
    grammar, if the answer must follow one, is compiled (once per distinct grammar)."""
    count = protocol.count_messages(body)
    if count is not None:  # before the full parse, which costs ~5 us a message
        state.check_message_count(count)
    parsed = protocol.parse_chat_request(body)
    messages = [message.as_dict() for message in parsed.messages]
    state.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
    prompt_ids = chat_prompt_ids(state, messages, parsed.tools)
    return parsed, prompt_ids, _grammar(state, parsed)


def chat_prompt_ids(state: Serving, messages: list[dict[str, str]], tools=(), **template):
    """The chat template's prompt for `messages` (and `tools`), bounded, then tokenized."""
    arguments = with_tools(messages, list(tools), state.tokenizer.chat_template or "")
    text = state.tokenizer.apply_chat_template(
        **arguments, add_generation_prompt=template.get("add_generation_prompt", True),
        tokenize=False,
    )  # fmt: skip
    state.check_prompt_chars(len(cast(str, text)), "messages")
    # As apply_chat_template(tokenize=True) does: the template writes the special tokens.
    return state.tokenizer.encode(cast(str, text), add_special_tokens=False)


async def _prepare_completion(http: HTTPRequest, state: Serving):
    parsed, prompt_ids, grammar = await off_loop(_tokenize_completion, await http.body(), state)
    rid = f"cmpl-{uuid.uuid4().hex}"
    choices = make_choices(state, prompt_ids, parsed, rid, "prompt", grammar)
    return choices, parsed, TextFormat(rid, parsed, state.tokenizer)


def _tokenize_completion(body: bytes, state: Serving):
    parsed = protocol.parse_completion_request(body)
    if not isinstance(parsed.prompt, str):
        prompt_ids = [int(t) for t in parsed.prompt]
        _check_token_ids(state, prompt_ids, "prompt")
    else:
        state.check_prompt_chars(len(parsed.prompt), "prompt")
        prompt_ids = state.tokenizer.encode(parsed.prompt, add_special_tokens=False)
    return parsed, prompt_ids, _grammar(state, parsed)


def _check_token_ids(state: Serving, ids, param: str) -> None:
    if ids and max(ids) >= len(state.tokenizer):
        raise APIError(f"'{param}' has token ids outside the vocabulary", param=param)


def _grammar(state: Serving, parsed: GenerationRequest) -> str | None:
    """The grammar the answer must follow (tools first, then response_format), compiled once
    here (a 400 if it cannot be); and the logit_bias keys checked against the vocabulary."""
    _check_token_ids(state, [int(k) for k in parsed.logit_bias], "logit_bias")
    grammar, param = None, "response_format"
    if isinstance(parsed, protocol.ChatCompletionRequest):
        grammar, param = tool_grammar(parsed), "tools"
    fmt = parsed.response_format
    if grammar is None and fmt is not None and fmt.type != "text":
        param = "response_format"
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        try:
            grammar = json_grammar(schema)
        except ValueError as exc:
            raise APIError(f"'response_format' has no usable schema: {exc}", param=param) from None
    if grammar is not None:
        grammars_for(state.tokenizer).compiled(grammar, param)
    return grammar


def make_choices(
    state: Serving, prompt_ids: list[int], parsed, rid: str, param: str, grammar: str | None
) -> list[Request]:
    """The request's n choices: one Request each, the same prompt, one channel for their
    deltas, each its own sampler and grammar state. A seeded request's choice i draws from seed
    + i, so the same request gives the same n answers every time."""
    channel = DeltaChannel()
    choices = []
    for index in range(parsed.n):
        constraint = None
        if grammar is not None:
            constraint = grammars_for(state.tokenizer).constraint(grammar, "response_format")
        choices.append(
            state.make_request(
                prompt_ids,
                parsed,
                rid,
                param,
                channel=channel,
                constraint=constraint,
                index=index,
                grammar=grammar,
            )  # fmt: skip
        )
    for choice in choices:
        choice.siblings = choices
    return choices


async def _generate(http: HTTPRequest, prepare) -> Response:
    """Validate, submit, answer; report exactly one outcome to the observer."""
    arrival = time.monotonic()  # latencies count from here, body parsing included
    state, first = None, None
    try:
        state = serving(http)
        choices, params, fmt = await prepare(http, state)
        first = choices[0]
        for choice in choices:
            choice.arrival_time = arrival
            read_headers(http, choice)
        state.observer.on_start(http, first)
        return await _respond(http, state, choices, params, fmt)
    except ClientDisconnect:  # gone while still sending its body: nobody to answer
        if state is not None:
            state.observer.on_end(http, Outcome.CANCELLED, first)
        return Response(status_code=499)
    except APIError as exc:
        if state is not None:
            state.observer.on_end(http, Outcome.for_status(exc.status), first)
        raise
    except Exception:
        if state is not None:
            state.observer.on_end(http, Outcome.SERVER_ERROR, first)
        raise


async def models(http: HTTPRequest) -> Response:
    name = serving(http).config.served_model_name
    card = {"id": name, "object": "model", "created": 0, "owned_by": "llm-inference-gateway"}
    return JSONResponse({"object": "list", "data": [card]})


async def health(http: HTTPRequest) -> Response:
    serving(http)
    return JSONResponse({"status": "ok"})


async def tokenize(http: HTTPRequest) -> Response:
    """vLLM's POST /tokenize: a prompt, or chat messages through the template, to token ids."""
    state = serving(http)
    parsed = await off_loop(protocol.parse_tokenize_request, await http.body())
    _check_model(state, parsed.model)
    return JSONResponse(await off_loop(_tokenized, state, parsed))


def _tokenized(state: Serving, parsed: protocol.TokenizeRequest) -> dict:
    if parsed.messages is not None:
        messages = [m.as_dict() for m in parsed.messages]
        state.check_message_count(len(messages))
        state.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = chat_prompt_ids(
            state, messages, parsed.tools, add_generation_prompt=parsed.add_generation_prompt
        )
    else:
        prompt = parsed.prompt or ""
        state.check_prompt_chars(len(prompt), "prompt")
        ids = state.tokenizer.encode(prompt, add_special_tokens=parsed.add_special_tokens)
    strings = [token_text(state.tokenizer, t) for t in ids] if parsed.return_token_strs else None
    return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
            "token_strs": strings}  # fmt: skip


async def detokenize(http: HTTPRequest) -> Response:
    """vLLM's POST /detokenize: token ids to text."""
    state = serving(http)
    parsed = await off_loop(protocol.parse_detokenize_request, await http.body())
    _check_model(state, parsed.model)
    _check_token_ids(state, parsed.tokens, "tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(parsed.tokens)})


async def debug_timeline(http: HTTPRequest) -> Response:
    """The engine's last iterations as Chrome Trace Event JSON (open it in Perfetto): ?last=N
    for the last N only, ?after=K for those numbered after K. 404 for an engine that keeps no
    timeline (steps 0-2, or the timeline switched off)."""
    timeline = getattr(serving(http).engine, "timeline", None)
    if timeline is None:
        raise APIError("this server records no timeline", 404, code="no_timeline")
    last = _count_param(http, "last")
    iterations, spans = timeline.snapshot(last or None, after=_count_param(http, "after"))
    return JSONResponse(trace(iterations, spans))


def _count_param(http: HTTPRequest, name: str) -> int:
    raw = http.query_params.get(name, "0")
    if not raw.isdigit() or len(raw) > 12:
        raise APIError(f"'{name}' must be a non-negative integer", param=name)
    return int(raw)


def _check_model(state: Serving, model: str | None) -> None:
    if model is not None and model != state.config.served_model_name:
        raise APIError(f"model '{model}' does not exist", param="model", code="model_not_found")


ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", models, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/tokenize", tokenize, methods=["POST"]),
    Route("/detokenize", detokenize, methods=["POST"]),
    Route("/debug/timeline", debug_timeline, methods=["GET"]),
]


# ---------------------------------------------------------------- answering


async def _respond(http, state: Serving, choices: list[Request], params, fmt) -> Response:
    await _submit_all(state, choices)
    first = choices[0]
    if params.stream:
        events = _sse(http, state, choices, fmt, params.include_usage)
        headers = {**_SSE_HEADERS, **response_headers(first)}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    result = await until_disconnect(http, _collect(choices), on_disconnect=_cancel_all(choices))
    if result is None:  # nobody is listening any more
        state.observer.on_end(http, Outcome.CANCELLED, first)
        return Response(status_code=499)
    use = usage(first)
    state.observer.on_end(http, Outcome.SUCCESS, first)
    return JSONResponse(fmt.whole(result, use), headers=response_headers(first))


async def _submit_all(state: Serving, choices: list[Request]) -> None:
    """Every choice through the pipeline; if one is refused, the others are called off."""
    try:
        for choice in choices:
            await state.submit(choice)
    except BaseException:
        _cancel_all(choices)()
        raise


def _cancel_all(choices: list[Request]) -> Callable[[], None]:
    def cancel() -> None:
        for choice in choices:
            choice.cancel()

    return cancel


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def choice_deltas(choices: list[Request]) -> AsyncIterator[Delta]:
    """Every delta of every choice, as they come, until each choice has ended; a choice's
    error is raised."""
    channel = choices[0].channel
    assert channel is not None
    running = len(choices)
    while running:
        delta = await channel.receive()
        if delta.error is not None:
            raise delta.error
        yield delta
        running -= delta.finish_reason is not None


async def _collect(choices: list[Request]) -> list[Choice]:
    collected = [Choice(i) for i in range(len(choices))]
    async for delta in choice_deltas(choices):
        choice = collected[delta.index]
        choice.text += delta.text
        choice.logprobs += delta.logprobs
        choice.finish_reason = delta.finish_reason or choice.finish_reason
    return collected


async def until_disconnect(
    http: HTTPRequest, work: Awaitable[T], on_disconnect: Callable[[], None] | None = None
) -> T | None:
    """Await `work`; if the client hangs up first, call `on_disconnect`, cancel `work` and
    return None. (Step 9's router awaits a replica's answer the same way.)"""
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


async def _sse(http, state: Serving, choices: list[Request], fmt, include_usage: bool):
    outcome = Outcome.CANCELLED  # unless the stream gets to its end
    first = choices[0]
    try:
        for chunk in fmt.first_chunks(len(choices)):
            yield sse_event(chunk)
        async for delta in choice_deltas(choices):
            for chunk in fmt.chunks(delta.index, delta.text, delta.finish_reason, delta.logprobs):
                yield sse_event(chunk)
        if include_usage:
            use = usage(first)
            yield sse_event(protocol.usage_chunk(fmt.kind, fmt.rid, fmt.model, use))
        yield "data: [DONE]\n\n"
        outcome = Outcome.SUCCESS
    except APIError as exc:  # e.g. a deadline passed while queued: headers are already sent
        outcome = Outcome.for_status(exc.status)
        yield sse_event(exc.body())
    except Exception as exc:  # report in-band, as OpenAI does
        outcome = Outcome.SERVER_ERROR
        log.exception("stream %s failed", first.request_id)
        yield sse_event(APIError(f"generation failed: {type(exc).__name__}", 500).body())
    finally:
        _cancel_all(choices)()  # a no-op when finished; stops the worker when the client left
        state.observer.on_end(http, outcome, first)


def sse_event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
