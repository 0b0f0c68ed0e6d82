"""The OpenAI request schemas, as pydantic models, and the response builders.

The models are the documentation of the accepted API: every field's type, range and meaning is
declared below. A body is parsed straight from its bytes by pydantic, whose JSON parser refuses
NaN and Infinity, lone UTF-16 surrogates, invalid UTF-8, nesting deeper than about 200 levels and
integers longer than 4300 digits. Then every field is validated strictly: no "1" for 1, no 1.0
for an integer, no 1 for true; finite floats only; an explicit range for every number. Each
failure becomes one OpenAI-shaped 400 naming the parameter (`messages[0].content`,
`temperature`, ...) and saying what it must be.

Honoured beyond the basics: `response_format` (JSON, or JSON that a schema accepts), `tools`
with `tool_choice`, `logprobs` / `top_logprobs`, `logit_bias` and `n`. Fields that would change
what the answer means but are not honoured (`echo`, `suffix`, `best_of` other than `n`, the
legacy `functions`, audio, ...) get a 400 naming them (`UNSUPPORTED`). Other unknown fields are
ignored, as OpenAI-compatible servers (vLLM, TGI, llama.cpp) do, so that a client written for
the richer OpenAI API still gets an answer: `user`, `metadata`, `store`, `service_tier` and the
like change nothing here. A field sent as null counts as not sent.
"""

from __future__ import annotations

import json
import time
import types
import typing
from typing import Annotated, Any, Literal, Union

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
MAX_N = 8  # choices per request
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries
MAX_SCHEMA_BYTES = 32 << 10  # a response_format schema or a tool's parameters, as JSON
MAX_TOOLS = 64
INT32_MAX = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch.Generator accepts
Role = Literal["system", "user", "assistant", "developer", "tool"]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_sent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def _small_schema(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value))
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"{size} bytes of JSON, over {MAX_SCHEMA_BYTES}")
    return value


class TextPart(Strict):
    type: Literal["text"] = Field(description="'text' (only text parts are supported)")
    text: str = Field(description="a string")


class CalledFunction(Strict):
    name: Name = Field(description="a function name (letters, digits, _ and -; at most 64)")
    arguments: str = Field(description="a string (the call's arguments, as JSON)")


class ToolCall(Strict):
    id: str = Field(description="a string")
    type: Literal["function"] = Field(description="'function'")
    function: CalledFunction = Field(description="an object with name and arguments")


class Message(Strict):
    role: Role = Field(description="one of system, user, assistant, developer, tool")
    content: str | list[TextPart] | None = Field(
        None, description="a string or an array of text parts"
    )
    name: str | None = Field(None, description="a string")
    tool_calls: list[ToolCall] | None = Field(
        None, max_length=MAX_TOOLS, description="an array of tool calls (assistant only)"
    )
    tool_call_id: str | None = Field(None, description="a string (tool messages)")

    @model_validator(mode="after")
    def _has_content(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is missing (only an assistant's tool calls go without)")
        return self

    def as_dict(self) -> dict[str, str]:
        """For the chat template: text parts joined, `developer` read as `system`, and an
        assistant's tool calls written out as the JSON the model is asked to answer with."""
        text = self.content or ""
        if not isinstance(text, str):
            text = "".join(part.text for part in text)
        for call in self.tool_calls or []:
            arguments = _json_or_text(call.function.arguments)
            text += json.dumps({"name": call.function.name, "arguments": arguments})
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


def _json_or_text(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="a boolean")


class JsonSchema(Strict):
    name: Name = Field(description="a name (letters, digits, _ and -; at most 64)")
    description: str | None = Field(None, description="a string")
    schema_: dict[str, Any] = Field(
        default_factory=dict, alias="schema", description="a JSON schema (an object)"
    )
    strict: bool | None = Field(None, description="a boolean")

    _size = field_validator("schema_")(_small_schema)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="one of text, json_object, json_schema"
    )
    json_schema: JsonSchema | None = Field(None, description="an object with name and schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema")
        return self


class FunctionDefinition(Strict):
    name: Name = Field(description="a function name (letters, digits, _ and -; at most 64)")
    description: str | None = Field(None, description="a string")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="a JSON schema for the arguments (an object)",
    )
    strict: bool | None = Field(None, description="a boolean")

    _size = field_validator("parameters")(_small_schema)


class Tool(Strict):
    type: Literal["function"] = Field(description="'function'")
    function: FunctionDefinition = Field(description="an object with name and parameters")


class NamedFunction(Strict):
    name: Name = Field(description="the name of one of the tools")


class NamedToolChoice(Strict):
    type: Literal["function"] = Field(description="'function'")
    function: NamedFunction = Field(description="an object with the function's name")


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice

# Fields that would change what an answer means, and are not honoured: a 400, never silence.
UNSUPPORTED = {
    "suffix": "insertion (suffix) is not supported",
    "echo": "echo is not supported",
    "functions": "the legacy functions field is not supported; use tools",
    "function_call": "the legacy function_call field is not supported; use tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
}


class GenerationRequest(Strict):
    """What both endpoints share: model, length, sampling, choices and streaming."""

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
    n: int = Field(1, ge=1, le=MAX_N, description=f"an integer from 1 to {MAX_N}")
    logit_bias: dict[TokenKey, Bias] = Field(
        default_factory=dict,
        max_length=MAX_LOGIT_BIAS,
        description=f"an object of at most {MAX_LOGIT_BIAS} token ids to numbers in [-100, 100]",
    )
    response_format: ResponseFormat | None = Field(
        None, description="an object: {type: text | json_object | json_schema}"
    )
    stream: bool = Field(False, description="a boolean")
    stream_options: StreamOptions = Field(StreamOptions(), description="an object")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if data.get(name) not in (None, False, "", []):
                    raise APIError(f"'{name}': {why}", param=name, code="unsupported_parameter")
        return data

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

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to return with its log probability; None: no logprobs."""
        return None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=list(self.stop),
            logit_bias={int(k): v for k, v in self.logit_bias.items()},
            logprobs=self.num_logprobs,
        )


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1, description="a non-empty array of messages")
    max_completion_tokens: int | None = Field(
        None, ge=1, le=INT32_MAX, description="an integer of at least 1"
    )
    logprobs: bool = Field(False, description="a boolean")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description=f"an integer from 0 to {MAX_TOP_LOGPROBS}"
    )
    tools: list[Tool] = Field(
        default_factory=list, max_length=MAX_TOOLS, description="an array of function tools"
    )
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto, required, or {type: function, function: {name}}"
    )
    modalities: list[Literal["text"]] | None = Field(None, description="['text']")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        choice = self.tool_choice
        names = [tool.function.name for tool in self.tools]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            name = choice.function.name
            message = f"'tool_choice' names {name!r}, not one of the tools"
            raise APIError(message, param="tool_choice")
        if choice == "required" and not self.tools:
            raise APIError("'tool_choice' 'required' needs tools", param="tool_choice")
        if len(set(names)) < len(names):
            raise APIError("two tools have the same name", param="tools")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def forced_tool(self) -> FunctionDefinition | None:
        """The function the answer must call (tool_choice names it), if any."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return next(t.function for t in self.tools if t.function.name == choice.function.name)
        return None


class CompletionRequest(GenerationRequest):
    prompt: NonEmptyStr | list[NonEmptyStr] | list[TokenId] = Field(
        description="a non-empty string or a non-empty array of token ids (one prompt per request)"
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description=f"an integer from 0 to {MAX_TOP_LOGPROBS}"
    )
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="equal to n (or 1)")

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

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of not in (None, 1, self.n):
            message = "'best_of' other than n is not supported (every choice is returned)"
            raise APIError(message, param="best_of", code="unsupported_parameter")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


class TokenizeRequest(Strict):
    """vLLM's POST /tokenize: a prompt, or chat messages (through the chat template)."""

    model: str | None = Field(None, description="a string")
    prompt: str | None = Field(None, description="a string")
    messages: list[Message] | None = Field(
        None, min_length=1, description="a non-empty array of messages"
    )
    tools: list[Tool] = Field(
        default_factory=list, max_length=MAX_TOOLS, description="an array of function tools"
    )
    add_special_tokens: bool = Field(True, description="a boolean")
    add_generation_prompt: bool = Field(True, description="a boolean")
    return_token_strs: bool = Field(False, description="a boolean")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give either 'prompt' or 'messages'", param="prompt")
        return self


class DetokenizeRequest(Strict):
    """vLLM's POST /detokenize."""

    model: str | None = Field(None, description="a string")
    tokens: list[TokenId] = Field(description="an array of token ids")


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
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):  # (too deep)
        return None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def parse_completion_request(body: bytes) -> CompletionRequest:
    return _parse(CompletionRequest, body)


def parse_tokenize_request(body: bytes) -> TokenizeRequest:
    return _parse(TokenizeRequest, body)


def parse_detokenize_request(body: bytes) -> DetokenizeRequest:
    return _parse(DetokenizeRequest, body)


def _parse(model: type[Strict], body: bytes):
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise _as_api_error(exc.errors(include_url=False), model) from None


def _as_api_error(errors: list[ErrorDetails], model: type[Strict]) -> APIError:
    """One 400 for the most specific of pydantic's errors (a union reports one per member)."""
    first = errors[0]
    if first["type"] == "json_invalid":
        message = f"request body is not valid JSON: {first['msg']}"
        return APIError(message, code="invalid_json")
    if not first["loc"]:
        return APIError("request body must be a JSON object", code="invalid_json")
    found = [(e, *_field_path(model, e["loc"])) for e in errors]
    error, path, expected_of = max(found, key=lambda p: len(p[1]))
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in path)[1:]
    expected = f"'{param}' must be {expected_of}"
    if error["type"] == "missing":
        return APIError(f"{expected}; it is missing", param=param)
    code = "unsupported_value" if path[-1] == "n" and error["type"] != "int_type" else None
    return APIError(f"{expected}: {_detail(error)}", param=param, code=code)


def _field_path(model: type[Strict], loc: tuple) -> tuple[list, str]:
    """The field names and list indexes of a location, ending on a field name, and what that
    field must be (its description). Walks the models along the location: union members'
    tags ('str', ...) are dropped, and so is the index of an item of a list of scalars (`stop`,
    not `stop[0]`)."""
    path: list = []
    described = [""]
    models = [model]
    for part in loc:
        if isinstance(part, int):
            path.append(part)
            continue
        fields = {f.alias or name: f for m in models for name, f in m.model_fields.items()}
        if part in fields:
            path.append(part)
            described.append(fields[part].description or "valid")
            models = _models_in(fields[part].annotation)
    while path and isinstance(path[-1], int):
        path.pop()
    return path, described[-1]


def _models_in(annotation: Any) -> list[type[Strict]]:
    """The request models a field's type is made of (list[Message] -> [Message], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return [annotation]
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType, list, dict, Annotated):
        return [m for arg in args for m in _models_in(arg)]
    return []


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


def chat_response(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {**_envelope("chat.completion", rid, model, choices), "usage": use}


def chat_chunk(
    rid: str, model: str, index: int, delta: dict, finish: str | None, logprobs=None
) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return _envelope("chat.completion.chunk", rid, model, [choice])


def completion_response(rid: str, model: str, choices: list[dict], use=None) -> dict:
    """Serves both the whole response (with usage) and a streamed chunk: the shapes agree."""
    body = _envelope("text_completion", rid, model, choices)
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
