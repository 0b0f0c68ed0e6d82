"""One sequence, one token at a time: prefill the prompt, then decode with transformers' KV cache.

This is what `model.generate` does for a single prompt, written out so that a worker can stop
after any token (cancellation) and hand each token to its request as soon as it exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import DynamicCache

from common.model import LoadedModel
from common.request import Request, RequestStatus, log_done


@torch.inference_mode()
def generate_steps(lm: LoadedModel, request: Request) -> Iterator[None]:
    """Runs `request` to its end, yielding after every token so the caller can interleave."""
    request.status = RequestStatus.RUNNING
    cache = DynamicCache()
    input_ids = torch.tensor([request.prompt_ids], device=lm.device)  # [1, prompt_len]
    while not request.cancelled:
        # logits_to_keep=1: only the last position's logits are needed, not the prompt's.
        out = lm.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = request.sample(out.logits[0, -1])  # logits: [1, 1, vocab]
        if request.append_token(token):
            return
        yield
        input_ids = torch.tensor([[token]], device=lm.device)
    request.drop_cancelled()


def generate(lm: LoadedModel, request: Request, **log_fields: object) -> None:
    """Run one request to completion on the calling thread; faults go to the request."""
    try:
        for _ in generate_steps(lm, request):
            pass
    except Exception as exc:  # the worker must outlive a bad request
        request.fail(exc)
    log_done(request, **log_fields)
