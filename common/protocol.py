"""The OpenAI request schemas and their validation, plus response builders.

Validation turns a decoded JSON body into a typed request or raises APIError(400) naming the
offending parameter. Unknown fields are ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from common.errors import APIError
from common.sampling import SamplingParams

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_STOP_SEQUENCES = 4


@dataclass
class GenerateParams:
    """What both endpoints share: model, sampling and streaming options."""

    model: str
    sampling: SamplingParams
    max_tokens: int | None
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatCompletionRequest:
    messages: list[dict[str, str]]
    params: GenerateParams


@dataclass
class CompletionRequest:
    prompt: str | list[int]
    params: GenerateParams


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    body = _require_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array", param="messages")
    return ChatCompletionRequest(
        [_parse_message(m, i) for i, m in enumerate(messages)],
        _parse_params(body, max_tokens_keys=("max_completion_tokens", "max_tokens")),
    )


def parse_completion_request(body: Any) -> CompletionRequest:
    body = _require_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    is_token_list = isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt)
    if not (isinstance(prompt, str) and prompt) and not is_token_list:
        raise APIError(
            "'prompt' must be a non-empty string or a non-empty array of token ids "
            "(one prompt per request)",
            param="prompt",
        )
    return CompletionRequest(prompt, _parse_params(body, max_tokens_keys=("max_tokens",)))


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object", code="invalid_json")
    return body


def _parse_message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise APIError(f"'{param}' must be an object", param=param)
    role = message.get("role")
    if role not in ROLES:
        raise APIError(f"'{param}.role' must be one of {', '.join(ROLES)}", param=f"{param}.role")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": "..."}]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise APIError(f"'{param}.content' parts must be text", param=f"{param}.content")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise APIError(f"'{param}.content' must be a string", param=f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def _parse_params(body: dict, max_tokens_keys: tuple[str, ...]) -> GenerateParams:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError("'model' must be a non-empty string", param="model")
    n = _number(body, "n", int, 1, 1, None)
    if n != 1:
        raise APIError("only n=1 is supported", param="n", code="unsupported_value")
    max_tokens = None
    for key in max_tokens_keys:
        if body.get(key) is not None:
            max_tokens = _number(body, key, int, None, 1, None)
            break
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")
    sampling = SamplingParams(
        temperature=_number(body, "temperature", float, 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", float, 1.0, 0.0, 1.0, open_low=True),
        top_k=_number(body, "top_k", int, -1, -1, None),
        seed=_number(body, "seed", int, None, None, None),
        stop=_parse_stop(body.get("stop")),
    )
    if sampling.top_k == 0:
        raise APIError("'top_k' must be -1 (disabled) or at least 1", param="top_k")
    return GenerateParams(model, sampling, max_tokens, stream, include_usage)


def _parse_stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise APIError("'stop' must be a non-empty string or an array of them", param="stop")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences", param="stop")
    return stop


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(body: dict, key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{param or key}' must be a boolean", param=param or key)
    return value


def _number(body, key, kind, default, low, high, open_low=False):
    value = body.get(key)
    if value is None:
        return default
    ok = (
        _is_int(value)
        if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    if not ok:
        raise APIError(f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        bound = (
            f"in ({low}, {high}]"
            if open_low
            else f"at least {low}"
            if high is None
            else (f"between {low} and {high}")
        )
        raise APIError(f"'{key}' must be {bound}, got {value}", param=key)
    return kind(value)


# ---------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV came from a prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    message = {"role": "assistant", "content": text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {**_envelope("chat.completion", rid, model, [choice]), "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _envelope("chat.completion.chunk", rid, model, [choice])


def completion_response(rid: str, model: str, text: str, finish: str | None, use=None) -> dict:
    """Serves both the whole response (with usage) and a streamed chunk: the shapes agree."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    body = _envelope("text_completion", rid, model, [choice])
    if use:
        body["usage"] = use
    return body


def usage_chunk(kind: str, rid: str, model: str, use: dict) -> dict:
    """The extra last chunk sent when stream_options.include_usage is set: no choices."""
    return {**_envelope(kind, rid, model, []), "usage": use}


def _envelope(kind: str, rid: str, model: str, choices: list) -> dict:
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
