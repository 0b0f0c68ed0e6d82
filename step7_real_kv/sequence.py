"""A sequence: one request as the KV cache sees it, with its progress and its blocks.

The request (common.request) owns the tokens (prompt, then output) and the status; the sequence
only points at them. What it owns is where those tokens' keys and values live: how many of them
are computed into the pool, and the block table that says where. After a preemption the block
table is empty and `num_computed` is 0 again, but the request keeps its tokens: the sequence is
prefilled anew over prompt and output and goes on where it was.
"""

from __future__ import annotations

from common.request import Request


class Sequence:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.num_computed = 0  # leading tokens whose K/V are in the pool
        self.block_table: list[int] = []  # block ids, in token order (their names: blocks)
        self.num_preemptions = 0

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def reset(self) -> None:
        """Forget the cache state (after preemption); the request keeps the tokens."""
        self.block_table = []
        self.num_computed = 0
