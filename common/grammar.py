"""Structured outputs: a grammar that says which tokens may come next, at every step.

A request that asks for JSON (`response_format`), JSON a schema accepts, or a call to one of its
tools gets a grammar, compiled by llguidance (the library vLLM, SGLang and llama.cpp use for
this) from the JSON schema. Before each token is sampled, the grammar's matcher computes the set
of tokens that keep the text valid (a bitmask over the vocabulary, one bit per token) and every
other token's logit becomes -inf; after the token is chosen, the matcher consumes it. When the
grammar is complete the request ends ("stop"); if max_tokens comes first it ends "length", with
valid but unfinished JSON.

JSON is written compactly, with ", " and ": " between items, and no other whitespace: a model
that may write whitespace anywhere can fill max_tokens with it, and a fixed layout lets a tool
call's name and arguments be streamed as they are generated (common/tools.py).

Compiling is the costly part (a JSON schema becomes a grammar, then the grammar a matcher, with
its lexer): each distinct grammar is compiled once, on the thread that validates the request,
and kept in a bounded LRU; a request gets a copy of the compiled matcher, which is cheap. A
schema that llguidance cannot compile gets a 400 naming the parameter, before any engine sees
the request.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.errors import APIError

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer
    from transformers import PreTrainedTokenizerBase

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHED_GRAMMARS = 128


def json_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text that `schema` accepts (None: any JSON object)."""
    from llguidance import LLMatcher

    schema = {"type": "object"} if schema is None else schema
    return LLMatcher.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)  # type: ignore[arg-type]


class GrammarError(Exception):
    """The matcher refused a token (it cannot happen for a token the mask allowed)."""


class Constraint:
    """One sequence's grammar state: the mask for its next token, and the tokens it took."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._bits = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
        self.consumed = 0  # tokens taken so far
        self._complete_at: int | None = None  # ... when the grammar became complete

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits: [vocab] -> the same, -inf for every token the grammar does not allow now."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        bits = np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little")
        width = min(logits.numel(), self.vocab_size)  # tokens past the tokenizer: never
        allowed = torch.zeros(logits.numel(), dtype=torch.bool)
        allowed[:width] = torch.from_numpy(bits[:width].astype(bool))
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self.matcher.consume_token(token_id):
            raise GrammarError(f"token {token_id} breaks the grammar: {self.matcher.get_error()}")
        self.consumed += 1
        if self._complete_at is None and self.matcher.is_stopped():
            self._complete_at = self.consumed

    def complete_after(self, num_tokens: int) -> bool:
        """The grammar was complete once it had taken the first `num_tokens` tokens: nothing
        but the end may follow them. (Asked by count, not of the matcher's state now: step 8's
        grammar takes a whole verified run of tokens before they are appended one by one.)"""
        return self._complete_at is not None and num_tokens >= self._complete_at


class Grammars:
    """Compiled grammars for one tokenizer, each compiled once (LRU-bounded); thread-safe."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, capacity: int = CACHED_GRAMMARS):
        self.vocab_size = len(tokenizer)
        self.capacity = capacity
        self._tokenizer = tokenizer
        self._compiled: OrderedDict[str, LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def ll_tokenizer(self) -> LLTokenizer:
        """llguidance's view of the vocabulary: about a second to build, once."""
        import llguidance.hf

        return llguidance.hf.from_tokenizer(self._tokenizer)  # type: ignore[arg-type]

    def constraint(self, grammar: str, param: str) -> Constraint:
        """A fresh matcher for `grammar`; a 400 naming `param` if it does not compile."""
        return Constraint(self.compiled(grammar, param).deep_copy(), self.vocab_size)

    def compiled(self, grammar: str, param: str) -> LLMatcher:
        with self._lock:
            matcher = self._compiled.get(grammar)
            if matcher is not None:
                self._compiled.move_to_end(grammar)
                return matcher
        matcher = self._compile(grammar, param)
        with self._lock:
            self._compiled[grammar] = matcher
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return matcher

    def _compile(self, grammar: str, param: str) -> LLMatcher:
        from llguidance import LLMatcher

        matcher = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            reason = matcher.get_error().splitlines()[0][:300]
            raise APIError(f"'{param}' cannot be used as a grammar: {reason}", param=param)
        return matcher


@functools.cache
def grammars_for(tokenizer: PreTrainedTokenizerBase) -> Grammars:
    return Grammars(tokenizer)


def describe(schema: dict[str, Any]) -> str:
    """A schema as compact JSON (for prompts and cache keys)."""
    return json.dumps(schema, separators=(",", ":"), sort_keys=True)
