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

import functools
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
    decode_tables: torch.Tensor  # [num_decodes, most blocks] block ids, padded with 0
    decode_lengths: torch.Tensor  # [num_decodes] context of each, its new token included
    block_size: int
    prefills: list[Prefill]
    sample_rows: torch.Tensor  # [S] rows whose logits are sampled
    sampled: list[Sequence]  # the S sequences that get a token this iteration

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @functools.cached_property
    def decode_slots_and_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the torch path: the slots of each decoding sequence's whole context, padded with
        slot 0, and the mask that hides the padding; both [num_decodes, longest context]."""
        offsets = torch.arange(self.block_size, device=self.decode_tables.device)
        # [B, blocks, 1] * block_size + [block_size] -> [B, blocks * block_size] slots, in order
        slots = (self.decode_tables[:, :, None] * self.block_size + offsets).flatten(1)
        longest = int(self.decode_lengths.max()) if self.num_decodes else 1
        slots = slots[:, :longest]
        mask = torch.arange(longest, device=slots.device)[None, :] < self.decode_lengths[:, None]
        return slots.masked_fill(~mask, 0), mask


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
    tables, lengths = _decode_tables([s for s, _ in decodes], device)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Batch(
        as_long(ids), as_long(positions), as_long(slots), len(decodes), tables, lengths,
        block_size, prefills, as_long(rows), sampled,
    )  # fmt: skip


def _decode_tables(seqs: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decoding sequence's block table, padded to the widest, and its context length."""
    widest = max((len(s.block_table) for s in seqs), default=1)
    rows = [s.block_table + [0] * (widest - len(s.block_table)) for s in seqs]
    tables = torch.tensor(rows, dtype=torch.long).view(len(seqs), widest)
    lengths = torch.tensor([s.num_computed + 1 for s in seqs], dtype=torch.long)
    return tables.to(device), lengths.to(device)
