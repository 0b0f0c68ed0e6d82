"""Sampling one token from a row of logits: greedy, temperature, top-k, top-p, penalties, seeded.

Each request owns its torch.Generator, so a seeded request draws the same tokens whether it runs
alone or inside a batch with others. Whatever validated parameters it gets, a sampler returns a
token: temperatures below 1e-5 sample greedily (as vLLM does: dividing by them overflows), and
top-p always keeps the most likely token, however small p is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def deterministic(self) -> bool:
        return self.greedy or self.seed is not None

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self._generator: torch.Generator | None = None

    def sample(self, logits: torch.Tensor, output_ids: list[int] | None = None) -> int:
        """logits: [vocab] for the last position; output_ids: the tokens generated so far (for
        the penalties). Returns the chosen token id."""
        p = self.params
        if p.penalized and output_ids:  # (None or empty: nothing to penalize yet)
            logits = _penalize(logits.float(), output_ids, p)
        if p.greedy:
            return int(torch.argmax(logits))
        logits = logits.float() / p.temperature
        if 0 < p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            probs = _top_p_filter(probs, p.top_p)
        return int(torch.multinomial(probs, 1, generator=self._generator_for(probs.device)))

    def _generator_for(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


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
