"""Tools (function calling) through the same grammar as structured outputs.

- `tool_choice` names a function: the answer is that function's arguments, JSON that its
  `parameters` schema accepts (the grammar makes sure of it), returned as one `tool_calls` entry.
- `tool_choice: "required"`: the answer is `{"name": ..., "arguments": {...}}` for one of the
  tools, the grammar an `anyOf` over them, each with its name as a constant.
- `"auto"` or `"none"` (or no tool_choice): the answer is text. SmolLM2 was not trained to decide
  when to call a tool, so nothing is parsed out of a text answer.

The tools are put in the prompt: through the chat template when it knows what tools are, else
(SmolLM2's template does not) as a system message that lists them. A finished call comes back
with `finish_reason: "tool_calls"`; one cut short by max_tokens with "length", as OpenAI does.

Streaming follows OpenAI's shape: the first chunk carries the call's id, type and name with
empty arguments, the next ones pieces of the arguments. The grammar writes JSON in a fixed
layout (common/grammar.py), so for "required" the name is known as soon as its closing quote is
generated, and the arguments are the text between `"arguments": ` and the final `}`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from common.grammar import json_grammar
from common.protocol import ChatCompletionRequest, FunctionDefinition, Tool

HEADER = '{"name": "'
ARGUMENTS = '", "arguments": '


def tool_grammar(request: ChatCompletionRequest) -> str | None:
    """The grammar the answer must follow for the request's tool_choice, or None (text)."""
    forced = request.forced_tool
    if forced is not None:
        return json_grammar(forced.parameters)
    if request.tool_choice == "required":
        return json_grammar({"anyOf": [_call_schema(t.function) for t in request.tools]})
    return None


def _call_schema(function: FunctionDefinition) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": function.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def with_tools(messages: list[dict[str, str]], tools: list[Tool], template: str) -> dict:
    """apply_chat_template's arguments for a conversation with tools: the template's own way
    when it has one, else a system message listing them."""
    if not tools:
        return {"conversation": messages}
    functions = [tool.model_dump(by_alias=True, exclude_none=True) for tool in tools]
    if "tools" in template:
        return {"conversation": messages, "tools": functions}
    listing = "\n".join(json.dumps(f["function"]) for f in functions)
    text = (
        "You can call these functions. To call one, answer with a JSON object "
        '{"name": <its name>, "arguments": <its arguments>} and nothing else:\n' + listing
    )
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
        return {"conversation": [first, *messages[1:]]}
    return {"conversation": [{"role": "system", "content": text}, *messages]}


class ToolCallText:
    """One choice's generated text read as a tool call, whole or as it streams."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        forced = request.forced_tool
        self.name: str | None = forced.name if forced is not None else None
        self.wrapped = forced is None  # "required": {"name": ..., "arguments": ...}
        self.id = f"call_{uuid.uuid4().hex[:24]}"
        self.text = ""
        self.sent = 0  # characters of the arguments already streamed
        self.started = False

    def arguments(self, final: bool) -> str | None:
        """The arguments' text so far (a wrapped call's final `}` held back until the end);
        None while a wrapped call's name is not complete."""
        if not self.wrapped:
            return self.text
        head, sep, rest = self.text.partition(ARGUMENTS)
        if not sep or not head.startswith(HEADER):
            return None
        self.name = head[len(HEADER) :]
        return rest[:-1] if final else rest[: max(0, len(rest) - 1)]

    def feed(self, text: str, final: bool = False) -> list[dict]:
        """The `tool_calls` deltas for the next piece of text (OpenAI's streamed shape)."""
        self.text += text
        arguments = self.arguments(final)
        if arguments is None or self.name is None:
            return []
        deltas = []
        if not self.started:
            self.started = True
            function = {"name": self.name, "arguments": ""}
            deltas.append({"index": 0, "id": self.id, "type": "function", "function": function})
        piece, self.sent = arguments[self.sent :], len(arguments)
        if piece:
            deltas.append({"index": 0, "function": {"arguments": piece}})
        return deltas

    def whole(self, text: str) -> list[dict] | None:
        """The message's `tool_calls` for a complete answer; None if it is no call at all."""
        self.text = text
        arguments = self.arguments(final=True)
        if arguments is None or self.name is None:
            return None
        function = {"name": self.name, "arguments": arguments}
        return [{"id": self.id, "type": "function", "function": function}]
