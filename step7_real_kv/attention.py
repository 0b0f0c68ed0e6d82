"""Attention over the paged pool: queries of the new tokens against keys gathered by slot.

Grouped-query attention: 9 query heads share 3 key/value heads, query head h reading kv head
h // (9 // 3), as transformers' repeat_kv does. Instead of repeating K and V, the queries of one
kv head are stacked: q [.., kv_heads, group, ..] against k [.., kv_heads, ..].

This is the torch path, and the reference: it gathers each sequence's context out of the pool
into a padded copy, then calls SDPA. On a CPU, the speed layer runs the one-query rows (decodes,
short chunks) instead through speed/cpu_kernels.cpp's paged_attention_rows, which reads the pool
in place (the profile in the README says why); long prefill chunks, which are matrix work, stay
here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from step7_real_kv.batch import Batch
from step7_real_kv.paged_kv import PagedKVCache

DecodeKernel = Callable[..., torch.Tensor]  # speed/cpu_kernels.cpp's paged_attention_rows


def paged_attention(
    q: torch.Tensor,
    kv: PagedKVCache,
    layer: int,
    batch: Batch,
    decode_kernel: DecodeKernel | None = None,
) -> torch.Tensor:
    """q: [T, heads, head_dim] for the batch's new tokens, their K/V already written to the
    pool -> attention output [T, heads, head_dim]."""
    d = batch.num_decodes
    by_row = one_query_each(q[:d], kv, layer, batch, decode_kernel) if d else None
    if by_row is not None and d == q.shape[0]:  # no long prefill chunk in this batch
        return by_row
    out = torch.empty_like(q)
    if by_row is not None:
        out[:d] = by_row
    for chunk in batch.prefills:
        rows = slice(chunk.start, chunk.start + chunk.length)
        k, v = kv.gather(layer, chunk.context_slots)  # [context, kv_heads, head_dim]
        out[rows] = prefill_attention(q[rows], k, v)
    return out


def one_query_each(
    q: torch.Tensor, kv: PagedKVCache, layer: int, batch: Batch, kernel: DecodeKernel | None
) -> torch.Tensor:
    """The first rows of the batch, each one query attending to its own context length: the
    C++ kernel reads the pool in place; the torch path gathers a padded copy, then SDPA."""
    if kernel is not None:
        scale = q.shape[-1] ** -0.5  # as SDPA's default
        return kernel(
            q, kv.k[layer], kv.v[layer], batch.decode_tables,
            batch.decode_lengths, batch.block_size, scale,
        )  # fmt: skip
    slots, mask = batch.decode_slots_and_mask
    k, v = kv.gather(layer, slots)  # [rows, context, kv_heads, head_dim]
    return decode_attention(q, k, v, mask)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One query per sequence. q: [B, heads, dim]; k, v: [B, context, kv_heads, dim];
    mask: [B, context] bool (False on padding) -> [B, heads, dim]."""
    b, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.view(b, kv_heads, heads // kv_heads, dim)  # the group's queries as rows
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, kv_heads, context, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return out.reshape(b, heads, dim)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A chunk of n new tokens after `cached` earlier ones, causal. q: [n, heads, dim];
    k, v: [cached + n, kv_heads, dim] -> [n, heads, dim].

    One SDPA call over [1, heads, n, dim] against [1, kv_heads, context, dim]: enable_gqa lets
    query head h read kv head h // group (repeat_kv's pairing) without a copy. In this 4-D form
    SDPA on a CPU runs its flash kernel (keys in blocks, softmax kept online, several times
    faster at these lengths: the README's "Long prompts"); a 3-D call can only take the math
    kernel, which builds every [n, context] score matrix whole."""
    n, context = q.shape[0], k.shape[0]
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    if context == n:  # no cached prefix: plain causal, and the blocks above the diagonal skipped
        out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
    else:  # token i of the chunk sits at position cached + i and sees keys 0..cached + i
        causal = torch.ones(n, context, dtype=torch.bool, device=q.device).tril(context - n)
        out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal, enable_gqa=True)
    return out[0].transpose(0, 1)  # [n, heads, dim]
