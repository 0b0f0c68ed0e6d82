"""The OpenAI request schemas, as pydantic models, and the response builders.

The models are the documentation of the accepted API: every field's type, range and meaning is
declared below. A body is parsed straight from its bytes by pydantic, whose JSON parser refuses
NaN and Infinity, lone UTF-16 surrogates, invalid UTF-8, nesting deeper than about 200 levels and
integers longer than 4300 digits. Then every field is validated strictly: no "1" for 1, no 1.0
for an integer, no 1 for true; finite floats only; an explicit range for every number. Each
failure becomes one OpenAI-shaped 400 naming the parameter (`messages[0].content`,
`temperature`, ...) and saying what it must be.

Unknown fields are ignored, as OpenAI-compatible servers (vLLM, TGI, llama.cpp) do, so that a
client written for the richer OpenAI API still gets an answer: `logit_bias`, `user`, `tools`,
`response_format` and the like do nothing here. A field sent as null counts as not sent.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from common.errors import APIError
from common.sampling import SamplingParams

MAX_STOP_SEQUENCES = 4
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch.Generator accepts
Role = Literal["system", "user", "assistant", "developer", "tool"]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_sent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class TextPart(Strict):
    type: Literal["text"] = Field(description="'text' (only text parts are supported)")
    text: str = Field(description="a string")


class Message(Strict):
    role: Role = Field(description="one of system, user, assistant, developer, tool")
    content: str | list[TextPart] = Field(description="a string or an array of text parts")

    def as_dict(self) -> dict[str, str]:
        """For the chat template: text parts joined, and `developer` read as `system`."""
        text = self.content
        if not isinstance(text, str):
            text = "".join(part.text for part in text)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="a boolean")


class GenerationRequest(Strict):
    """What both endpoints share: model, length, sampling and streaming."""

    model: NonEmptyStr = Field(description="a non-empty string")
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX, description="an integer of at least 1")
    temperature: float = Field(
        1.0, ge=0.0, le=2.0, description="a number between 0.0 and 2.0 (0: greedy)"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="a number in (0.0, 1.0]")
    top_k: int = Field(
        -1, ge=-1, le=INT32_MAX, description="-1 (disabled) or an integer of at least 1"
    )
    seed: int | None = Field(
        None, ge=SEED_MIN, le=SEED_MAX, description="an integer in [-2^63, 2^64 - 1]"
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="a number between -2.0 and 2.0"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="a number between -2.0 and 2.0"
    )
    stop: NonEmptyStr | list[NonEmptyStr] = Field(
        default_factory=list,
        description=f"a non-empty string or an array of at most {MAX_STOP_SEQUENCES} of them",
    )
    n: int = Field(1, ge=1, le=1, description="1 (only n=1 is supported)")
    stream: bool = Field(False, description="a boolean")
    stream_options: StreamOptions = Field(StreamOptions(), description="an object")

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 keeps no token")
        return value

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str]) -> list[str]:
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"{len(stops)} given")
        return stops

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options.include_usage

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=list(self.stop),
        )


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1, description="a non-empty array of messages")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=INT32_MAX, description="an integer of at least 1"
    )

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: NonEmptyStr | list[NonEmptyStr] | list[TokenId] = Field(
        description="a non-empty string or a non-empty array of token ids (one prompt per request)"
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list) -> str | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str):
            if len(value) > 1:
                raise ValueError(f"{len(value)} prompts given")
            return value[0]
        if not value:
            raise ValueError("empty")
        return value


# ---------------------------------------------------------------- parsing into a 400


class _MessageCount(msgspec.Struct):
    messages: list[msgspec.Raw] = []


def count_messages(body: bytes) -> int | None:
    """How many messages a chat body holds, without parsing them (msgspec skips each one as
    raw bytes: about a millisecond for 28,000), so that a body too long to serve is refused
    before it costs a full parse. None when the body is not that shape: the full parse says
    what is wrong with it."""
    try:
        return len(msgspec.json.decode(body, type=_MessageCount).messages)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def parse_completion_request(body: bytes) -> CompletionRequest:
    return _parse(CompletionRequest, body)


def _parse(model: type[Strict], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _as_api_error(exc.errors(include_url=False)) from None


MODELS = (TextPart, Message, StreamOptions, ChatCompletionRequest, CompletionRequest)
# Field name -> what it must be: the descriptions above, reused in every error message.
EXPECTED = {name: f.description for m in MODELS for name, f in m.model_fields.items()}


def _as_api_error(errors: list[ErrorDetails]) -> APIError:
    """One 400 for the most specific of pydantic's errors (a union reports one per member)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        message = f"request body is not valid JSON: {first['msg']}"
        return APIError(message, code="invalid_json")
    if not first["loc"]:
        return APIError("request body must be a JSON object", code="invalid_json")
    error, path = max(((e, _field_path(e["loc"])) for e in errors), key=lambda p: len(p[1]))
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)[1:]
    field = path[-1]
    expected = f"'{param}' must be {EXPECTED[field]}"
    if error["type"] == "missing":
        return APIError(f"{expected}; it is missing", param=param)
    code = "unsupported_value" if field == "n" and error["type"] != "int_type" else None
    return APIError(f"{expected}: {_detail(error)}", param=param, code=code)


def _field_path(loc: tuple) -> list:
    """The field names and list indexes of a location, ending on a field name: union members'
    tags ('str', ...) are dropped, and so is the index of an item of a list of scalars (`stop`,
    not `stop[0]`)."""
    path = [part for part in loc if isinstance(part, int) or part in EXPECTED]
    while path and isinstance(path[-1], int):
        path.pop()
    return path


def _detail(error: ErrorDetails) -> str:
    reason = error["msg"].removeprefix("Value error, ").rstrip(".")
    given = repr(error.get("input"))
    given = given if len(given) <= 40 else given[:37] + "..."
    return f"{reason[:1].lower()}{reason[1:]}, got {given}"


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
