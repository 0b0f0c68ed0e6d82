"""The paged KV pool: every layer's keys and values live in one preallocated tensor of blocks.

Step 3 kept a contiguous, growing cache per batch (transformers' DynamicCache). Here the memory is
allocated once, at start-up: `num_blocks` blocks of `block_size` token slots per layer. Slot `s`
is token `s % block_size` of block `s // block_size`. A sequence owns a list of blocks (its block
table), so its cache needs no contiguous room and grows one block at a time; the block manager
decides which blocks, this class only stores and fetches through slot numbers:

    slot of a sequence's token at position p = block_table[p // block_size] * block_size
                                               + p % block_size
"""

from __future__ import annotations

import torch

from common.model import LoadedModel


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        # [layers, slots, kv_heads, head_dim]: blocks flattened into slots, so that writing
        # and gathering is one index operation. Zeros, not empty: padded decode rows read slot
        # 0 under a mask, and a NaN left in memory would poison the masked softmax. The whole
        # pool is resident from start-up (about 1.4 GiB at the float32 defaults).
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def for_model(cls, lm: LoadedModel, num_blocks: int, block_size: int) -> PagedKVCache:
        """A pool shaped for `lm`'s layers and key/value heads, in its dtype, on its device."""
        config = lm.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.num_hidden_layers, num_blocks, block_size,
            config.num_key_value_heads, head_dim, lm.dtype, lm.device,
        )  # fmt: skip

    @property
    def bytes_per_block(self) -> int:
        per_slot = self.k[:, 0].numel() * self.k.element_size() * 2  # K and V, every layer
        return per_slot * self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots: [T] long; k, v: [T, kv_heads, head_dim], the new tokens' keys and values."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def copy_block(self, source: int, target: int) -> None:
        """Block `target`'s slots take block `source`'s keys and values, in every layer."""
        size = self.block_size
        self.k[:, target * size : (target + 1) * size] = self.k[
            :, source * size : (source + 1) * size
        ]
        self.v[:, target * size : (target + 1) * size] = self.v[
            :, source * size : (source + 1) * size
        ]

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots: any shape [...] of slot numbers -> keys, values [..., kv_heads, head_dim]."""
        flat = slots.reshape(-1)
        shape = (*slots.shape, *self.k.shape[2:])
        k = self.k[layer].index_select(0, flat).view(shape)
        v = self.v[layer].index_select(0, flat).view(shape)
        return k, v


def slot_numbers(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The slots of token positions start..end-1 of a sequence with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]
