"""Sampling one token from a row of logits: greedy, temperature, top-k, top-p, penalties,
logit_bias, a grammar's mask, seeded; and the log probabilities a client asked for.

Each request owns its torch.Generator, so a seeded request draws the same tokens whether it runs
alone or inside a batch with others. Whatever validated parameters it gets, a sampler returns a
token: temperatures below 1e-5 sample greedily (as vLLM does: dividing by them overflows), and
top-p always keeps the most likely token, however small p is.

The order, as OpenAI and vLLM apply them: logit_bias is added to the model's logits, then the
presence and frequency penalties are subtracted, then a grammar (structured outputs) masks what
it does not allow, then temperature, top-k and top-p shape what is left. Log probabilities come
from the model's own distribution, before all of that (vLLM's default, "raw"): a token's
logprob says how likely the model found it, not how much the grammar or the bias pushed it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.grammar import Constraint

GREEDY_BELOW = 1e-5  # temperatures under this are greedy


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 disables
    seed: int | None = None
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # ... times the number of times it was generated
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # alternatives per token to report (0: the chosen one only)
    grammar: str | None = None  # the grammar the text must follow (common.grammar), if any

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def deterministic(self) -> bool:
        return self.greedy or self.seed is not None

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log probability and the most likely alternatives', in the model's
    raw distribution."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class Sampler:
    def __init__(self, params: SamplingParams, constraint: Constraint | None = None) -> None:
        self.params = params
        self.constraint = constraint
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._generator: torch.Generator | None = None
        self.last_logprobs: TokenLogprobs | None = None  # of the token `sample` returned last

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that changes the logits (no bias, penalty or grammar): its token
        is the row's argmax, which an engine may take for many rows in one call (`took`)."""
        p = self.params
        return p.greedy and not p.logit_bias and not p.penalized and self.constraint is None

    def sample(self, logits: torch.Tensor, output_ids: list[int] | None = None) -> int:
        """logits: [vocab] for the last position; output_ids: the tokens generated so far (for
        the penalties). Returns the chosen token id (its logprobs in `last_logprobs`)."""
        token = self._choose(self.shape(logits, output_ids))
        self.took(logits, token)
        return token

    def took(self, raw: torch.Tensor, token: int) -> None:
        """`token` is this sequence's next: its logprobs (from `raw`, the row's logits) are
        kept for append_token, and the grammar consumes it."""
        if self.params.logprobs is not None:
            self.last_logprobs = logprobs_of(raw, token, self.params.logprobs)
        if self.constraint is not None:
            self.constraint.accept(token)

    def shape(self, logits: torch.Tensor, output_ids: list[int] | None) -> torch.Tensor:
        """The logits after logit_bias, penalties and the grammar's mask."""
        p = self.params
        if p.logit_bias:
            logits = _bias(logits.float(), p.logit_bias)
        if p.penalized and output_ids:  # (None or empty: nothing to penalize yet)
            logits = _penalize(logits.float(), output_ids, p)
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        return logits

    def _choose(self, logits: torch.Tensor) -> int:
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = self.distribution(logits)
        return int(torch.multinomial(probs, 1, generator=self.generator(probs.device)))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities a sampled (not greedy) token is drawn from: shaped logits, then
        temperature, top-k and top-p."""
        p = self.params
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        return probs

    def generator(self, device: torch.device) -> torch.Generator:
        """This request's own random stream (seeded), made on first use."""
        return self._generator_for(device)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


def _bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    """OpenAI's logit_bias: a number in [-100, 100] added to a token's logit (-100 in effect
    bans it, +100 in effect forces it). Ids past the vocabulary were refused at the door."""
    ids = torch.tensor(list(bias), device=logits.device)
    values = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, values)


def _penalize(logits: torch.Tensor, output_ids: list[int], p: SamplingParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties over the tokens generated so far."""
    ids = torch.tensor(output_ids, device=logits.device)
    counts = torch.bincount(ids, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
    present = (counts > 0).to(logits.dtype)
    return logits - p.frequency_penalty * counts - p.presence_penalty * present


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop = mass_before >= top_p
    drop[0] = False  # the most likely token stays, even when top_p rounds to 0 in float32
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum()


def logprobs_of(raw: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    """`token`'s log probability in the model's raw distribution, and the `top` likeliest."""
    logprobs = torch.log_softmax(raw.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top:
        best = torch.topk(logprobs, top)
        alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True))
    return TokenLogprobs(token, float(logprobs[token]), alternatives)
