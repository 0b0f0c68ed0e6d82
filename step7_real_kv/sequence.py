"""A sequence: one request as the scheduler sees it, with its tokens, its progress and its blocks.

The request (common.request) owns what the client sees: sampled tokens, text, stop strings,
finish reason. The sequence owns what the KV cache needs: every token id so far (prompt, then
output), how many of them already have keys and values in the pool, and the block table that
says where. After a preemption the block table is empty and `num_computed` is 0 again, but the
tokens stay: the sequence is prefilled anew over prompt and output and goes on where it was.
"""

from __future__ import annotations

from common.request import Request


class Sequence:
    def __init__(self, request: Request) -> None:
        self.request = request
        self.token_ids: list[int] = list(request.prompt_ids)
        self.num_computed = 0  # leading tokens whose K/V are in the pool
        self.block_table: list[int] = []  # block ids, in token order
        self.num_named_blocks = 0  # leading full blocks already offered to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    def reset(self) -> None:
        """Forget the cache state (after preemption); the tokens are kept for recomputation."""
        self.block_table = []
        self.num_computed = 0
        self.num_named_blocks = 0
