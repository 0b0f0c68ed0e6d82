"""The runner's row-wise ops by cpu_kernels.cpp: the same methods as model_runner.TorchOps.

Each op is one pass over the rows where the torch code makes several (a dispatch each, and past
32k elements a fork and join of the OpenMP threads), and attention's one-query rows read the
pool in place where the torch code copies every context out of it first. Each kernel is tested
against the torch code it replaces (tests/test_step7_kernels.py).
"""

from __future__ import annotations

from types import ModuleType

import torch

from step7_real_kv.paged_kv import PagedKVCache


class KernelOps:
    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels  # the module cpu_kernels.load() returned
        self.decode_kernel = kernels.paged_attention_rows  # attention.py's one-query rows

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        return self.kernels.add_rms_norm_(x, delta, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_mul(gate_up)

    def rope_and_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: PagedKVCache,
        layer: int,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """q and k rotated in place and k, v stored, in one pass -> q [T, heads, head_dim]."""
        t, width, head_dim = qkv.shape
        rows = (t, head_dim)
        self.kernels.rope_and_store_(
            qkv, cos.view(rows), sin.view(rows), kv.k[layer], kv.v[layer], slots
        )
        return qkv[:, : width - 2 * kv.k.shape[2]]
