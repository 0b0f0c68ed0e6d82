"""One iteration's work, flattened: the new tokens of every scheduled sequence in one row.

Continuous batching mixes sequences at different stages: some decode one token, some prefill a
chunk of their prompt (after a cached prefix, perhaps). There is no padding on the token axis:
all T new tokens go through the linear layers as one [T, hidden] matrix. Only attention needs to
know where one sequence ends and the next begins; for that the batch carries, per sequence, the
slots of its whole context in the paged pool.

Rows that attend one query at a time come first, so that their attention runs as one batched
call: the token of every decoding sequence, and every token of a short prefill chunk (most
prompts are short once their cached prefix is skipped), each with its own context length.
Long prefill chunks follow, each attending as a whole (matrix work, where SDPA is fast).
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
    num_decodes: int  # rows 0..num_decodes-1 attend one query at a time
    decode_tables: torch.Tensor  # [num_decodes, most blocks] their sequences' block ids, 0-padded
    decode_lengths: torch.Tensor  # [num_decodes] context of each row, its own token included
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


SHORT_CHUNK = 32  # a prefill chunk of at most this many tokens attends one query at a time


def build_batch(work: list[tuple[Sequence, int]], block_size: int, device: torch.device) -> Batch:
    """work: (sequence, number of new tokens) pairs; blocks for them are already allocated."""
    short = [(s, n) for s, n in work if n <= SHORT_CHUNK]  # decodes (n = 1) and short chunks
    long = [(s, n) for s, n in work if n > SHORT_CHUNK]
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    rows: list[int] = []
    sampled: list[Sequence] = []
    prefills: list[Prefill] = []
    for i, (seq, n) in enumerate(short + long):
        start, end = seq.num_computed, seq.num_computed + n
        if i >= len(short):
            context = slot_numbers(seq.block_table, 0, end, block_size)
            prefills.append(Prefill(len(ids), n, torch.tensor(context, device=device)))
        ids += seq.token_ids[start:end]
        positions += range(start, end)
        slots += slot_numbers(seq.block_table, start, end, block_size)
        if end == seq.num_tokens:  # every known token computed: the next one can be sampled
            rows.append(len(ids) - 1)
            sampled.append(seq)
    tables, lengths = _query_tables(short, device)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Batch(
        as_long(ids), as_long(positions), as_long(slots), len(lengths), tables, lengths,
        block_size, prefills, as_long(rows), sampled,
    )  # fmt: skip


def _query_tables(
    short: list[tuple[Sequence, int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per new token of the short work: its sequence's block table, padded to the
    widest, and the context it sees (causal: its own position, and everything before)."""
    widest = max((len(s.block_table) for s, _ in short), default=1)
    tables, lengths = [], []
    for seq, n in short:
        padded = seq.block_table + [0] * (widest - len(seq.block_table))
        for position in range(seq.num_computed, seq.num_computed + n):
            tables.append(padded)
            lengths.append(position + 1)
    table_tensor = torch.tensor(tables, dtype=torch.long).view(len(tables), widest)
    return table_tensor.to(device), torch.tensor(lengths, dtype=torch.long).to(device)
