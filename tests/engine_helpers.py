"""Helpers for driving an engine in-process, on the event loop, without HTTP."""

from __future__ import annotations

import asyncio

from common.request import DeltaChannel, Request
from common.sampling import SamplingParams


def make_request(lm, prompt: str | list[int], max_tokens: int, **sampling) -> Request:
    """A request answering on a channel of the running event loop. `prompt`: text or ids."""
    ids = (
        lm.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
    )
    params = SamplingParams(**{"temperature": 0.0, **sampling})
    eos = {lm.tokenizer.eos_token_id}
    return Request(ids, params, max_tokens, lm.tokenizer, eos, channel=DeltaChannel())


async def drain(request: Request) -> str:
    return "".join([d.text async for d in request.deltas()])


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)
