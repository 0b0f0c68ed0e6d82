"""Our own forward pass over the llama weights, reading and writing the paged KV pool.

transformers' model wants a rectangular [batch, length] input and keeps its own cache. Continuous
batching feeds a ragged batch (decodes and prefill chunks side by side, see batch.py) whose cache
lives in our block pool, so this file runs the same llama arithmetic itself, on the loaded
model's own parameters: RMSNorm, rotary embeddings, grouped-query attention (attention.py), the
gated SiLU MLP. The order and dtype of each operation follow transformers' LlamaModel; on the
torch path greedy tokens in float32 come out the same, and the faster CPU path (oneDNN
matmuls, the C++ decode attention) is held to the same exactness tests.

Two shortcuts that do not change the arithmetic of a row: q/k/v and gate/up projections are
each fused into one matrix (one matmul instead of three or two), and the final norm and the
vocabulary projection run only on the rows that are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from common.model import LoadedModel
from step7_real_kv.attention import paged_attention
from step7_real_kv.batch import Batch
from step7_real_kv.paged_kv import PagedKVCache
from step7_real_kv.stored_weights import StoredWeight, differences


class Linear:
    """x @ weight.T ([T, in] -> [T, out]) by the fastest means where the weight lives.

    On a CPU in float32 (backend "auto"), through oneDNN with the weight reordered once, at
    start-up, into the blocked layout its kernels read, as torch.compile's weight freezing and
    vLLM's CPU backend do; F.linear goes to MKL's sgemm, which at this model's shapes took
    about twice as long (the README's profile). For a few rows (decoding at low concurrency)
    the work is a stream over the weight, and its bytes set the speed: cpu_kernels'
    block_linear reads the weight as the GGUF file stores it (stored_weights.py: Q4_1 blocks,
    5.6x fewer bytes than float32, the same weights), or, without the blocks, small_linear, a
    plain row-wise dot product over the float32 weight. Their sums come out in another order
    than F.linear's, so the last bits differ. Elsewhere, and with backend "torch", F.linear.
    """

    SMALL_ROWS = 4  # up to this many rows, small_linear (measured: README)
    BLOCK_ROWS = 8  # up to this many rows, block_linear (measured: README)

    def __init__(
        self,
        weight: torch.Tensor,
        backend: str,
        batch_hint: int,
        kernels: ModuleType | None,
        stored: StoredWeight | None = None,
    ) -> None:
        self.weight = weight  # [out, in]
        self.packed: torch.Tensor | None = None
        self.small = kernels.small_linear if kernels and weight.shape[1] % 32 == 0 else None
        self.stored = stored if kernels is not None else None
        self.block = kernels.block_linear if kernels is not None and stored is not None else None
        on_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
        if backend == "auto" and on_cpu and torch.backends.mkldnn.enabled:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.block is not None and self.stored is not None and rows <= self.BLOCK_ROWS:
            return self.block(x, self.stored.blocks, self.stored.kind)
        if self.small is not None and rows <= self.SMALL_ROWS:
            return self.small(x, self.weight)
        if self.packed is None:
            return F.linear(x, self.weight)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Linear  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Linear  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Linear  # [2 * intermediate, hidden]
    down: Linear  # [hidden, intermediate]


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
    ) -> None:
        """`stored`: the weights as the GGUF stores them (stored_weights.py), used for a few
        rows where they are the model's weights bit for bit (or whatever they are, `lossy`)."""
        config = lm.config
        self.kv = kv
        self.device = lm.device
        self.kernels = kernels  # cpu_kernels.cpp's, or None: the torch code below
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        params: dict[str, torch.Tensor] = dict(lm.model.named_parameters(remove_duplicate=False))
        stored = stored or {}
        self.lossy: list[str] = []  # the stored weights that are not the model's, bit for bit

        def linear(weight: torch.Tensor, name: str) -> Linear:
            piece = stored.get(name)
            if piece is not None and differences({name: piece}, {name: weight}):
                self.lossy.append(name)
            return Linear(weight, linear_backend, batch_hint, kernels, piece)

        self.embed = params["model.embed_tokens.weight"]  # [vocab, hidden]
        self.norm = params["model.norm.weight"]
        lm_head = params.get("lm_head.weight", self.embed)  # tied in SmolLM2
        self.lm_head = linear(lm_head, "lm_head")
        self.layers = [_layer(params, i, linear) for i in range(config.num_hidden_layers)]
        if self.lossy and not lossy:  # not the model's weights: float32 it is
            for matrix in self.linears:
                matrix.stored = matrix.block = None
        inv_freq = lm.model.model.rotary_emb.inv_freq  # the model's own, as its forward uses it
        self.cos, self.sin = rope_tables(inv_freq, config.max_position_embeddings, lm.dtype)

    @property
    def linears(self) -> list[Linear]:
        matrices = [(w.qkv, w.o, w.gate_up, w.down) for w in self.layers]
        return [self.lm_head, *(m for group in matrices for m in group)]

    @property
    def backends(self) -> dict[str, str]:
        """What runs the arithmetic, for the start-up log and gateway_engine_info."""
        linear = self.layers[0].qkv
        matmul = "onednn" if linear.packed is not None else "torch"
        kinds = "/".join(sorted({m.stored.kind for m in self.linears if m.stored}))
        if kinds:
            matmul += f"+{kinds}_blocks(<={Linear.BLOCK_ROWS} rows)"
            matmul += "_lossy" if self.lossy else ""
        elif linear.small is not None:
            matmul += f"+small_linear(<={Linear.SMALL_ROWS} rows)"
        kernels = "cpp" if self.kernels is not None else "torch"
        return {"kernels": kernels, "linear": matmul, "device": self.device.type}

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
        if self.kernels is not None:
            return self.kernels.add_rms_norm_(x, delta, weight, self.eps)
        x += delta
        return rms_norm(x, weight, self.eps)

    def mlp(self, w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        gate_up = w.gate_up(h)  # [T, 2 * intermediate]
        if self.kernels is not None:
            return w.down(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # [T, intermediate] each
        return w.down(F.silu(gate) * up)

    def _attention(self, i, w: LayerWeights, h, cos, sin, batch: Batch) -> torch.Tensor:
        t, heads = h.shape[0], self.heads
        qkv = w.qkv(h).view(t, heads + 2 * self.kv_heads, self.head_dim)
        if self.kernels is not None:  # rotate q and k in place, store k and v: one pass
            rows = (t, self.head_dim)
            k_pool, v_pool = self.kv.k[i], self.kv.v[i]
            self.kernels.rope_and_store_(
                qkv, cos.view(rows), sin.view(rows), k_pool, v_pool, batch.slots
            )
            q = qkv[:, :heads]
        else:
            qk = rotate(qkv[:, : heads + self.kv_heads], cos, sin)  # q and k heads in one go
            q, k, v = qk[:, :heads], qk[:, heads:], qkv[:, heads + self.kv_heads :]
            self.kv.write(i, batch.slots, k, v)
        kernel = self.kernels.paged_attention_rows if self.kernels is not None else None
        out = paged_attention(q, self.kv, i, batch, kernel)  # [T, heads, head_dim]
        return w.o(out.view(t, heads * self.head_dim))


def _layer(params: dict[str, torch.Tensor], i: int, linear) -> LayerWeights:
    p = lambda name: params[f"model.layers.{i}.{name}"]  # noqa: E731
    return LayerWeights(
        input_norm=p("input_layernorm.weight"),
        qkv=linear(torch.cat([p("self_attn.q_proj.weight"), p("self_attn.k_proj.weight"),
                              p("self_attn.v_proj.weight")]), f"{i}.qkv"),
        o=linear(p("self_attn.o_proj.weight"), f"{i}.o"),
        post_norm=p("post_attention_layernorm.weight"),
        gate_up=linear(torch.cat([p("mlp.gate_proj.weight"), p("mlp.up_proj.weight")]),
                       f"{i}.gate_up"),
        down=linear(p("mlp.down_proj.weight"), f"{i}.down"),
    )  # fmt: skip


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
