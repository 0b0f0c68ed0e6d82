"""The proposer: guess the next few tokens for nothing, by looking them up in what came before.

Prompt lookup (vLLM's `ngram` proposer, llama.cpp's lookup decoding): take the last n tokens
of the sequence (prompt and output so far), find the latest earlier place where the same n
tokens occur, and propose the k tokens that followed them there. Longer n-grams are tried
first (a longer match is a better guess), down to `ngram_min`. Nothing is proposed when no
earlier occurrence is found. A match close to the end (a run of repeats: "ha ha ha", a loop the
model is stuck in) has fewer than k tokens after it; the guess repeats them, as the text does.

It costs no model and no weights, and on text that repeats its input (a passage to copy, to
correct, to quote from, code to edit) it is right surprisingly often; on free writing it is
rarely right, and a wrong guess costs only the rows it takes in the batch (the engine verifies
every guess in the same forward pass as everything else).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigPart, knob


@dataclass(frozen=True)
class ProposerConfig(ConfigPart):
    num_speculative_tokens: int = knob(5, "k: draft tokens proposed per sequence per iteration")
    ngram_max: int = knob(4, "the longest n-gram looked up (tried first)")
    ngram_min: int = knob(2, "the shortest n-gram looked up")
    lookback: int = knob(2048, "how many of the latest tokens the lookup searches")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0 (0: no speculation)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("1 <= ngram_min <= ngram_max")
        if self.lookback < self.ngram_max + 1:
            raise ValueError("lookback must be longer than ngram_max")


class PromptLookup:
    def __init__(self, config: ProposerConfig) -> None:
        self.k = config.num_speculative_tokens
        self.ngram_max, self.ngram_min = config.ngram_max, config.ngram_min
        self.lookback = config.lookback

    def propose(self, tokens: list[int], k: int | None = None) -> list[int]:
        """Up to `k` (default: the configured k) tokens guessed to follow `tokens`."""
        k = self.k if k is None else k
        if k <= 0:
            return []
        window = tokens[-self.lookback :]
        for n in range(min(self.ngram_max, len(window) - 1), self.ngram_min - 1, -1):
            start = _latest_earlier(window, n)
            if start is not None:
                # What followed the match, up to now. Shorter than k when the match is near the
                # end: the text repeats with that period, so the guess goes on repeating it.
                follow = window[start + n :]
                return (follow * (k // len(follow) + 1))[:k]
        return []


def _latest_earlier(tokens: list[int], n: int) -> int | None:
    """Where the last n tokens last occurred before their own place (None: nowhere), such that
    at least one token follows that occurrence."""
    tail = tokens[-n:]
    first = tail[0]
    for i in range(len(tokens) - n - 1, -1, -1):  # latest first: the most recent context
        if tokens[i] == first and tokens[i : i + n] == tail:
            return i
    return None
