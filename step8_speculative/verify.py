"""Verification: keep the drafted tokens the model agrees with, then one token of its own.

One forward pass gives logits for every row of a drafted sequence: row i is what the model
predicts after the sequence's tokens and the first i draft tokens. Going row by row:

- greedy: the model's token is the argmax of the row (after bias, penalties and the grammar's
  mask, as without speculation). If it equals the draft token, that token is accepted and the
  next row is looked at; at the first disagreement the model's token is kept instead and
  verification stops. All k accepted: the last row gives one more token. So every iteration
  yields 1 to k + 1 tokens, each exactly the token plain decoding would have produced.
- sampling: the draft has no probabilities of its own (a lookup, not a model), which makes the
  rule simple: accept draft token x with probability p(x), the model's probability for it;
  otherwise draw from p with x taken out (renormalised). The token that comes out is
  distributed exactly as p: P(x) = p(x), and any other y comes out with (1 - p(x)) * p(y) /
  (1 - p(x)) = p(y). (vLLM's rejection sampler, with a one-hot draft distribution.)

A draft the grammar forbids is masked to -inf, so it is never accepted: greedy it is never the
argmax, sampled its p is 0. Each kept token goes through the sampler's bookkeeping as if it had
been sampled (logprobs from the row's raw logits; the grammar consumes it), in order.
"""

from __future__ import annotations

import torch

from common.request import Request
from common.sampling import TokenLogprobs

Kept = tuple[int, TokenLogprobs | None]  # a token to append, and its logprobs if asked for


def verify(request: Request, rows: torch.Tensor, draft: list[int]) -> list[Kept]:
    """rows: [len(draft) + 1, vocab] logits -> the tokens to append, 1 to len(draft) + 1."""
    sampler = request.sampler
    output_ids = list(request.output_ids)
    kept: list[Kept] = []
    for i, raw in enumerate(rows):
        proposed = draft[i] if i < len(draft) else None
        shaped = sampler.shape(raw, output_ids if sampler.params.penalized else None)
        token, accepted = _decide(sampler, shaped, proposed)
        sampler.took(raw, token)
        kept.append((token, sampler.last_logprobs))
        output_ids.append(token)
        if not accepted:
            break
    return kept


def _decide(sampler, logits: torch.Tensor, proposed: int | None) -> tuple[int, bool]:
    """(the token, whether it is the proposed one)."""
    if sampler.params.greedy:
        token = int(torch.argmax(logits))
        return token, token == proposed
    probs = sampler.distribution(logits)
    generator = sampler.generator(probs.device)
    if proposed is not None:
        if float(torch.rand(1, generator=generator, device=probs.device)) < float(probs[proposed]):
            return proposed, True
        rest = probs.clone()
        rest[proposed] = 0.0
        if float(rest.sum()) <= 0.0:  # (p(x) was 1: rejection had probability 0)
            return proposed, True
        probs = rest / rest.sum()
    return int(torch.multinomial(probs, 1, generator=generator)), False
