"""Our own forward pass over the llama weights, reading and writing the paged KV pool.

transformers' model wants a rectangular [batch, length] input and keeps its own cache. Continuous
batching feeds a ragged batch (decodes and prefill chunks side by side, see batch.py) whose cache
lives in our block pool, so this file runs the same llama arithmetic itself, on the loaded
model's own parameters: RMSNorm, rotary embeddings, grouped-query attention (attention.py), the
gated SiLU MLP. The order and dtype of each operation follow transformers' LlamaModel, so greedy
tokens in float32 come out the same.

Two shortcuts that do not change the arithmetic of a row: q/k/v and gate/up projections are
each fused into one matrix (one matmul instead of three or two), and the final norm and the
vocabulary projection run only on the rows that are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.model import LoadedModel
from step7_real_kv.attention import paged_attention
from step7_real_kv.batch import Batch
from step7_real_kv.paged_kv import PagedKVCache


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    o: torch.Tensor  # [hidden, heads * head_dim]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


class ModelRunner:
    def __init__(self, lm: LoadedModel, kv: PagedKVCache) -> None:
        config = lm.config
        self.kv = kv
        self.device = lm.device
        self.eps = config.rms_norm_eps
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        params: dict[str, torch.Tensor] = dict(lm.model.named_parameters(remove_duplicate=False))
        self.embed = params["model.embed_tokens.weight"]  # [vocab, hidden]
        self.norm = params["model.norm.weight"]
        self.lm_head = params.get("lm_head.weight", self.embed)  # tied in SmolLM2
        self.layers = [
            _layer(params, f"model.layers.{i}.") for i in range(config.num_hidden_layers)
        ]
        inv_freq = lm.model.model.rotary_emb.inv_freq  # the model's own, as its forward uses it
        self.cos, self.sin = rope_tables(inv_freq, config.max_position_embeddings, lm.dtype)

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """The batch's T new tokens through every layer -> logits [S, vocab] of sampled rows."""
        x = F.embedding(batch.input_ids, self.embed)  # [T, hidden]
        cos, sin = self.cos[batch.positions], self.sin[batch.positions]  # [T, 1, head_dim]
        for i, w in enumerate(self.layers):
            x = x + self._attention(i, w, rms_norm(x, w.input_norm, self.eps), cos, sin, batch)
            x = x + mlp(w, rms_norm(x, w.post_norm, self.eps))
        x = rms_norm(x[batch.sample_rows], self.norm, self.eps)  # [S, hidden]
        return F.linear(x, self.lm_head)

    def _attention(self, i, w: LayerWeights, h, cos, sin, batch: Batch) -> torch.Tensor:
        t = h.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        q, k, v = F.linear(h, w.qkv).split([q_size, kv_size, kv_size], dim=-1)
        q = rotate(q.view(t, self.heads, self.head_dim), cos, sin)
        k = rotate(k.view(t, self.kv_heads, self.head_dim), cos, sin)
        self.kv.write(i, batch.slots, k, v.view(t, self.kv_heads, self.head_dim))
        out = paged_attention(q, self.kv, i, batch)  # [T, heads, head_dim]
        return F.linear(out.view(t, q_size), w.o)


def _layer(params: dict[str, torch.Tensor], prefix: str) -> LayerWeights:
    p = lambda name: params[prefix + name]  # noqa: E731
    return LayerWeights(
        input_norm=p("input_layernorm.weight"),
        qkv=torch.cat([p("self_attn.q_proj.weight"), p("self_attn.k_proj.weight"),
                       p("self_attn.v_proj.weight")]),
        o=p("self_attn.o_proj.weight"),
        post_norm=p("post_attention_layernorm.weight"),
        gate_up=torch.cat([p("mlp.gate_proj.weight"), p("mlp.up_proj.weight")]),
        down=p("mlp.down_proj.weight"),
    )  # fmt: skip


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As LlamaRMSNorm: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def mlp(w: LayerWeights, h: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)  # [T, intermediate] each
    return F.linear(F.silu(gate) * up, w.down)


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
