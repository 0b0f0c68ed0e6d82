"""Step 3's static batcher, changed to prefill each request on its own through the prefix cache.

Step 3 left-pads all prompts and prefills them in one pass. Here each prompt first asks the
prefix cache for its longest cached prefix, prefills only the rest, and offers its own full
blocks back to the cache. The rows' key/value tensors are then left-padded into one batched
cache and decoded together exactly as in step 3 (`decode` is imported from there).
"""

from __future__ import annotations

import time
from functools import partial

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from common.model import LoadedModel
from common.request import Request
from common.timeline import Step, TimelineConfig
from step2_queue.queue import RequestQueue
from step3_batching.batcher import (
    BatchingConfig,
    BatchingEngine,
    BatchRecorder,
    decode,
    run_batch,
)
from step4_mock_kv.prefix_cache import LayerKV, MockPrefixCache


class PrefixBatchingEngine(BatchingEngine):
    """Step 3's engine; only how a batch is prefilled changes."""

    def __init__(
        self,
        lm: LoadedModel,
        queue: RequestQueue,
        config: BatchingConfig,
        prefix_cache: MockPrefixCache,
        timeline: TimelineConfig | None = None,
    ) -> None:
        super().__init__(lm, queue, config, timeline)
        self.prefix_cache = prefix_cache

    def run_batch(self, batch: list[Request]) -> None:
        compute = partial(_run, prefix_cache=self.prefix_cache)
        run_batch(self.lm, batch, compute, self.recorder())


@torch.inference_mode()
def _run(
    lm: LoadedModel, batch: list[Request], recorder: BatchRecorder, prefix_cache: MockPrefixCache
) -> None:
    start = time.monotonic()
    rows = [prefill(lm, r, prefix_cache) for r in batch]
    cache, mask, last_positions = stack_rows([kv for kv, _ in rows], lm.device)
    logits = torch.stack([row_logits for _, row_logits in rows])  # [B, vocab]
    # The rows' prefills, one forward pass each, as one iteration of the timeline.
    steps = [
        Step(r.trace_id, "prefill", r.num_prompt_tokens - r.cached_prompt_tokens,
             r.cached_prompt_tokens, cached=r.cached_prompt_tokens)
        for r in batch
    ]  # fmt: skip
    recorder.forward_done(start, steps)
    decode(lm, batch, cache, mask, last_positions, logits, recorder)


def prefill(lm: LoadedModel, request: Request, prefix_cache: MockPrefixCache):
    """Prefill one prompt, skipping its cached prefix. Returns (per-layer KV, last logits)."""
    # At least the last prompt token must run through the model: its logits give the first token.
    hit = prefix_cache.match(request.prompt_ids[:-1])
    try:
        cache = DynamicCache()
        for layer, (k, v) in enumerate(hit.state):
            cache.update(k, v, layer)
        suffix = torch.tensor([request.prompt_ids[hit.num_tokens :]], device=lm.device)
        out = lm.model(input_ids=suffix, cache=cache, use_cache=True, logits_to_keep=1)
    finally:
        prefix_cache.release(hit)
    request.cached_prompt_tokens = hit.num_tokens
    kv: list[LayerKV] = [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]
    prefix_cache.insert(request.prompt_ids, kv)
    return kv, out.logits[0, -1]


def stack_rows(rows: list[list[LayerKV]], device):
    """Left-pad each row's KV to the longest and stack: a [B, ...] cache, mask, last positions."""
    lengths = [row[0][0].shape[2] for row in rows]
    longest = max(lengths)
    cache = DynamicCache()
    for layer in range(len(rows[0])):
        keys = [_pad_left(row[layer][0], longest) for row in rows]
        values = [_pad_left(row[layer][1], longest) for row in rows]
        cache.update(torch.cat(keys), torch.cat(values), layer)  # [B, kv_heads, longest, dim]
    mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lengths], device=device)
    last_positions = torch.tensor([[n - 1] for n in lengths], device=device)
    return cache, mask, last_positions


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    """[1, heads, n, dim] -> [1, heads, length, dim], zeros first (masked out)."""
    return F.pad(t, (0, 0, length - t.shape[2], 0))
