"""One iteration's work, flattened: the new tokens of every scheduled sequence in one row.

Continuous batching mixes sequences at different stages: some decode one token, some prefill a
chunk of their prompt (after a cached prefix, perhaps). There is no padding on the token axis:
all T new tokens go through the linear layers as one [T, hidden] matrix. Only attention needs to
know where one sequence ends and the next begins; for that the batch carries, per sequence, the
slots of its whole context in the paged pool.

Decoding sequences come first (one token each) so that their attention runs as one batched call;
prefill chunks follow, each attending on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from step7_real_kv.paged_kv import slot_numbers
from step7_real_kv.sequence import Sequence


@dataclass
class Prefill:
    start: int  # first row of this chunk in the flat batch
    length: int  # new tokens in the chunk
    context_slots: torch.Tensor  # [cached + length] slots of every key the chunk attends to


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T], position of each token in its own sequence
    slots: torch.Tensor  # [T], where each new token's K/V is written
    num_decodes: int  # rows 0..num_decodes-1 are single decode tokens
    decode_slots: torch.Tensor  # [num_decodes, longest context], padded with slot 0
    decode_mask: torch.Tensor  # [num_decodes, longest context] bool, False on padding
    prefills: list[Prefill]
    sample_rows: torch.Tensor  # [S] rows whose logits are sampled
    sampled: list[Sequence]  # the S sequences that get a token this iteration

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def build_batch(work: list[tuple[Sequence, int]], block_size: int, device: torch.device) -> Batch:
    """work: (sequence, number of new tokens) pairs; blocks for them are already allocated."""
    decodes = [(s, n) for s, n in work if n == 1 and s.num_computed > 0]
    chunks = [(s, n) for s, n in work if not (n == 1 and s.num_computed > 0)]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    sampled: list[Sequence] = []
    prefills: list[Prefill] = []
    for i, (seq, n) in enumerate(decodes + chunks):
        start, end = seq.num_computed, seq.num_computed + n
        if i >= len(decodes):
            context = slot_numbers(seq.block_table, 0, end, block_size)
            prefills.append(Prefill(len(ids), n, torch.tensor(context, device=device)))
        ids += seq.token_ids[start:end]
        positions += range(start, end)
        slots += slot_numbers(seq.block_table, start, end, block_size)
        if end == seq.num_tokens:  # every known token computed: the next one can be sampled
            rows.append(len(ids) - 1)
            sampled.append(seq)
    decode_slots, decode_mask = _decode_context([s for s, _ in decodes], block_size, device)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Batch(
        as_long(ids), as_long(positions), as_long(slots), len(decodes),
        decode_slots, decode_mask, prefills, as_long(rows), sampled,
    )  # fmt: skip


def _decode_context(
    seqs: list[Sequence], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots of each decoding sequence's whole context (the new token included), padded."""
    if not seqs:
        empty = torch.zeros((0, 1), dtype=torch.long, device=device)
        return empty, empty.bool()
    lengths = torch.tensor([s.num_computed + 1 for s in seqs], device=device)
    widest = max(len(s.block_table) for s in seqs)
    tables = torch.zeros((len(seqs), widest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        tables[row, : len(seq.block_table)] = torch.tensor(seq.block_table)
    # [B, blocks, 1] * block_size + [block_size] -> [B, blocks * block_size] slots, in order
    offsets = torch.arange(block_size)
    slots = (tables[:, :, None] * block_size + offsets).flatten(1).to(device)
    longest = int(lengths.max())
    slots = slots[:, :longest]
    mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
    return slots.masked_fill(~mask, 0), mask
