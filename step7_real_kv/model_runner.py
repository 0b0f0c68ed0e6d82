"""Our own forward pass over the llama weights, reading and writing the paged KV pool.

transformers' model wants a rectangular [batch, length] input and keeps its own cache. Continuous
batching feeds a ragged batch (decodes and prefill chunks side by side, see batch.py) whose cache
lives in our block pool, so this file runs the same llama arithmetic itself, on the loaded
model's own parameters: RMSNorm, rotary embeddings, grouped-query attention (attention.py), the
gated SiLU MLP. The order and dtype of each operation follow transformers' LlamaModel, so
greedy tokens in float32 come out the same.

Two shortcuts that do not change the arithmetic of a row: q/k/v and gate/up projections are
each fused into one matrix (one matmul instead of three or two), and the final norm and the
vocabulary projection run only on the rows that are sampled.

This file is the torch reference: Linear (F.linear) and TorchOps. The speed layer (speed/)
answers the same two interfaces faster on a CPU: FastLinear (oneDNN, small_linear, the stored
blocks) and KernelOps (the C++ kernels); the runner takes them where the engine's knobs allow
and reads the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
import torch.nn.functional as F

from common.model import LoadedModel
from step7_real_kv.attention import DecodeKernel, paged_attention
from step7_real_kv.batch import Batch
from step7_real_kv.paged_kv import PagedKVCache
from step7_real_kv.speed.kernel_ops import KernelOps
from step7_real_kv.speed.linear import describe, fast_linears, set_block_rows
from step7_real_kv.speed.stored_weights import StoredWeight

Matmul = Callable[[torch.Tensor], torch.Tensor]  # x [T, in] -> x @ weight.T [T, out]


class Linear:
    """x @ weight.T ([T, in] -> [T, out]) by F.linear: the reference (speed/linear.py's
    FastLinear is the faster one)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [out, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Ops(Protocol):
    """The row-wise ops of a layer: TorchOps below, or the speed layer's KernelOps."""

    decode_kernel: DecodeKernel | None  # attention's one-query rows, or None: gather + SDPA

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor: ...

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor: ...

    def rope_and_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: PagedKVCache,
        layer: int,
        slots: torch.Tensor,
    ) -> torch.Tensor: ...


class TorchOps:
    """Ops in torch: the reference, as transformers computes them."""

    decode_kernel: DecodeKernel | None = None

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """x += delta, in place (the residual add); returns RMSNorm(x) * weight."""
        x += delta
        return rms_norm(x, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 * intermediate] -> SiLU(gate) * up, [T, intermediate]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope_and_store(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: PagedKVCache,
        layer: int,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """qkv [T, heads + 2 * kv_heads, head_dim]: q and k rotated, k and v written to the
        pool's slots -> q [T, heads, head_dim]."""
        kv_heads = kv.k.shape[2]
        heads = qkv.shape[1] - 2 * kv_heads
        qk = rotate(qkv[:, : heads + kv_heads], cos, sin)  # q and k heads in one go
        kv.write(layer, slots, qk[:, heads:], qkv[:, heads + kv_heads :])
        return qk[:, :heads]


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Matmul  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Matmul  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Matmul  # [2 * intermediate, hidden]
    down: Matmul  # [hidden, intermediate]


class ModelRunner:
    def __init__(
        self,
        lm: LoadedModel,
        kv: PagedKVCache,
        linear_backend: str = "auto",
        kernels: ModuleType | None = None,
        batch_hint: int = 64,
        stored: dict[str, StoredWeight] | None = None,
        lossy: bool = False,
        block_rows: int = 0,
    ) -> None:
        """The torch reference with `linear_backend="torch"` and no `kernels`; otherwise the
        speed layer's pieces: `kernels` (cpu_kernels.load()'s module) for the row-wise ops,
        `linear_backend="auto"` for oneDNN, `stored` (the GGUF's blocks) for matmuls of a few
        rows where they are the model's weights bit for bit (or whatever they are, `lossy`),
        up to `block_rows` rows (0: measured here, now)."""
        config = lm.config
        self.kv = kv
        self.device = lm.device
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        params: dict[str, torch.Tensor] = dict(lm.model.named_parameters(remove_duplicate=False))
        weights = fused_weights(params, config.num_hidden_layers)
        self.lossy: list[str] = []  # the stored weights that are not the model's, bit for bit
        linears: dict[str, Matmul]
        if linear_backend == "torch" and kernels is None:  # the reference
            linears, self.linear_paths = {n: Linear(w) for n, w in weights.items()}, "torch"
        else:  # the speed layer's matmuls
            fast, self.lossy = fast_linears(
                weights, linear_backend, batch_hint, kernels, stored, lossy
            )
            forward_order = [m for name, m in fast.items() if name != "lm_head"]
            set_block_rows([*forward_order, fast["lm_head"]], block_rows)
            self.linear_paths = describe(fast["0.qkv"], list(fast.values()), bool(self.lossy))
            linears = dict(fast)
        self.ops: Ops = KernelOps(kernels) if kernels is not None else TorchOps()
        self.embed = params["model.embed_tokens.weight"]  # [vocab, hidden]
        self.norm = params["model.norm.weight"]
        self.lm_head = linears["lm_head"]
        self.layers = [_layer(params, i, linears) for i in range(config.num_hidden_layers)]
        inv_freq = lm.model.model.rotary_emb.inv_freq  # the model's own, as its forward uses it
        self.cos, self.sin = rope_tables(inv_freq, config.max_position_embeddings, lm.dtype)

    @property
    def linears(self) -> list[Matmul]:
        matrices = [(w.qkv, w.o, w.gate_up, w.down) for w in self.layers]
        return [self.lm_head, *(m for group in matrices for m in group)]

    @property
    def backends(self) -> dict[str, str]:
        """What runs the arithmetic, for the start-up log and gateway_engine_info."""
        kernels = "torch" if isinstance(self.ops, TorchOps) else "cpp"
        return {"kernels": kernels, "linear": self.linear_paths, "device": self.device.type}

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """The batch's T new tokens through every layer -> logits [S, vocab] of sampled rows."""
        x = F.embedding(batch.input_ids, self.embed)  # [T, hidden]: the residual stream
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]  # [T, 1, head_dim]
        delta = torch.zeros_like(x)  # what the last block adds to the stream
        for i, w in enumerate(self.layers):
            h = self.add_norm(x, delta, w.input_norm)
            delta = self._attention(i, w, h, cos, sin, batch)
            h = self.add_norm(x, delta, w.post_norm)
            delta = self.mlp(w, h)
        x += delta
        x = rms_norm(x[batch.sample_rows], self.norm, self.eps)  # [S, hidden]
        return self.lm_head(x)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor):
        """x += delta, in place (the residual add); returns RMSNorm(x) * weight."""
        return self.ops.add_norm(x, delta, weight, self.eps)

    def mlp(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        gate_up = w.gate_up(h)  # [T, 2 * intermediate]
        return w.down(self.ops.silu_mul(gate_up))

    def _attention(self, i, w: LayerWeights, h, cos, sin, batch: Batch) -> torch.Tensor:
        t, heads = h.shape[0], self.heads
        qkv = w.qkv(h).view(t, heads + 2 * self.kv_heads, self.head_dim)
        q = self.ops.rope_and_store(qkv, cos, sin, self.kv, i, batch.slots)  # [T, heads, dim]
        out = paged_attention(q, self.kv, i, batch, self.ops.decode_kernel)
        return w.o(out.view(t, heads * self.head_dim))


def fused_weights(params: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """The runner's matrices by name: "lm_head" and each layer's "i.qkv", "i.o", "i.gate_up",
    "i.down", q/k/v and gate/up joined along the output rows."""
    weights = {"lm_head": params.get("lm_head.weight", params["model.embed_tokens.weight"])}
    for i in range(num_layers):  # (the vocabulary projection above is tied in SmolLM2)
        layer = f"model.layers.{i}"
        attn = [params[f"{layer}.self_attn.{n}_proj.weight"] for n in "qkv"]
        mlp = [params[f"{layer}.mlp.{n}_proj.weight"] for n in ("gate", "up")]
        weights[f"{i}.qkv"] = torch.cat(attn)
        weights[f"{i}.o"] = params[f"{layer}.self_attn.o_proj.weight"]
        weights[f"{i}.gate_up"] = torch.cat(mlp)
        weights[f"{i}.down"] = params[f"{layer}.mlp.down_proj.weight"]
    return weights


def _layer(params: dict[str, torch.Tensor], i: int, linears: dict[str, Matmul]) -> LayerWeights:
    return LayerWeights(
        input_norm=params[f"model.layers.{i}.input_layernorm.weight"],
        qkv=linears[f"{i}.qkv"],
        o=linears[f"{i}.o"],
        post_norm=params[f"model.layers.{i}.post_attention_layernorm.weight"],
        gate_up=linears[f"{i}.gate_up"],
        down=linears[f"{i}.down"],
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As LlamaRMSNorm: normalise in float32, cast back, then scale. In float32 that is exactly
    torch's fused F.rms_norm (one op instead of six; the same bits)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_tables(
    inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, [max_positions, 1, head_dim], computed as transformers'
    default rotary embedding does per step (float32 angles, cast to the model dtype)."""
    positions = torch.arange(max_positions, device=inv_freq.device).float()
    angles = positions[:, None] * inv_freq.float()[None, :]  # [P, head_dim / 2]
    emb = torch.cat((angles, angles), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates pairs (i, i + head_dim / 2) by each token's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
