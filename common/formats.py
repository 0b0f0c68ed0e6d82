"""Shaping the answer: a request's choices into OpenAI's chat or text completion objects, whole
or chunk by chunk, with their log probabilities and tool calls.

A choice is one of the n sequences of a request (`Request.index`); the API collects each one's
text, finish reason and logprobs (`Choice`) for a whole answer, or hands each delta over as it
comes for a stream, where every chunk says which choice it belongs to.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common import protocol
from common.protocol import ChatCompletionRequest, GenerationRequest
from common.sampling import TokenLogprobs
from common.tools import ToolCallText

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Choice:
    """What one choice has produced so far."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)


class ChatFormat:
    kind = "chat.completion.chunk"

    def __init__(self, rid: str, params: ChatCompletionRequest, tokenizer) -> None:
        self.rid, self.model, self.tokenizer = rid, params.model, tokenizer
        self.wants_logprobs = params.logprobs
        calls = params.forced_tool is not None or params.tool_choice == "required"
        self.calls = [ToolCallText(params) for _ in range(params.n)] if calls else None

    def whole(self, choices: list[Choice], use: dict) -> dict:
        return protocol.chat_response(
            self.rid, self.model, [self._message(c) for c in choices], use
        )

    def _message(self, choice: Choice) -> dict:
        message: dict = {"role": "assistant", "content": choice.text}
        finish = choice.finish_reason
        calls = self.calls[choice.index].whole(choice.text) if self.calls else None
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls" if finish == "stop" else finish
        logprobs = self._logprobs(choice.logprobs) if self.wants_logprobs else None
        return {
            "index": choice.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish,
        }

    def first_chunks(self, n: int) -> list[dict]:
        role = {"role": "assistant", "content": None if self.calls else ""}
        return [protocol.chat_chunk(self.rid, self.model, i, role, None) for i in range(n)]

    def chunks(self, index: int, text: str, finish: str | None, logprobs) -> list[dict]:
        """The chunks for one delta of choice `index`: its text, or for a tool call first
        the call's id and name, then pieces of its arguments."""
        entries = self._logprobs(logprobs) if self.wants_logprobs and logprobs else None
        if self.calls is None:
            if not text and finish is None and entries is None:
                return []
            delta = {"content": text} if text else {}
            return [protocol.chat_chunk(self.rid, self.model, index, delta, finish, entries)]
        call = self.calls[index]
        deltas = [{"tool_calls": [d]} for d in call.feed(text, final=finish is not None)]
        finish = "tool_calls" if finish == "stop" and call.started else finish
        if finish is not None or entries is not None:
            deltas = deltas or [{}]
        chunks = [protocol.chat_chunk(self.rid, self.model, index, d, None) for d in deltas]
        if chunks:  # the last chunk carries the end and the logprobs
            chunks[-1]["choices"][0].update(finish_reason=finish, logprobs=entries)
        return chunks

    def _logprobs(self, entries: list[TokenLogprobs]) -> dict:
        token = functools.partial(_token_entry, self.tokenizer)
        content = [
            {**token(e.token_id, e.logprob), "top_logprobs": [token(i, lp) for i, lp in e.top]}
            for e in entries
        ]
        return {"content": content}


class TextFormat:
    kind = "text_completion"

    def __init__(self, rid: str, params: GenerationRequest, tokenizer) -> None:
        self.rid, self.model, self.tokenizer = rid, params.model, tokenizer
        self.wants_logprobs = params.num_logprobs is not None
        self.offsets: dict[int, int] = {}  # per choice: characters of text already sent

    def whole(self, choices: list[Choice], use: dict) -> dict:
        rows = [self._choice(c.index, c.text, c.finish_reason, c.logprobs) for c in choices]
        return protocol.completion_response(self.rid, self.model, rows, use)

    def first_chunks(self, n: int) -> list[dict]:
        return []

    def chunks(self, index: int, text: str, finish: str | None, logprobs) -> list[dict]:
        if not text and finish is None and not logprobs:
            return []
        row = self._choice(index, text, finish, logprobs)
        return [protocol.completion_response(self.rid, self.model, [row])]

    def _choice(self, index: int, text: str, finish, logprobs) -> dict:
        entries = self._logprobs(index, logprobs) if self.wants_logprobs else None
        return {"index": index, "text": text, "logprobs": entries, "finish_reason": finish}

    def _logprobs(self, index: int, entries: list[TokenLogprobs]) -> dict:
        """The legacy shape: tokens, token_logprobs, top_logprobs and text_offset (characters
        from the start of this choice's text)."""
        offset = self.offsets.get(index, 0)
        tokens, offsets = [], []
        for e in entries:
            tokens.append(token_text(self.tokenizer, e.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        self.offsets[index] = offset
        top = [{token_text(self.tokenizer, i): lp for i, lp in e.top} for e in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def _token_entry(tokenizer: PreTrainedTokenizerBase, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1 << 16)
def token_bytes(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bytes:
    """The bytes a token stands for: a byte-level BPE token's characters map back to bytes
    one for one (GPT-2's table), so a token that ends inside a UTF-8 character keeps its own
    bytes; a special or other token, its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return str(tokenizer.decode([token_id])).encode()


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the
    others are moved to characters from 256 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}
