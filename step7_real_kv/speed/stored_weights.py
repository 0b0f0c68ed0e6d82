"""The weights as the model's file stores them: 4-bit blocks, read by the matmul as they are.

At one sequence, decoding is bound by how many bytes of weights each token reads: step 7's
float32 copy is 538 MB a token. But that copy holds nothing more than the GGUF file it was made
from (common/model.py), whose layers are Q4_1 blocks (20 bytes for 32 weights) and whose tied
embedding, the vocabulary projection, is Q8_0 (34 bytes for 32): 96 MB in all. Read as blocks,
with each weight computed inside the dot product exactly as the float32 copy holds it
(cpu_kernels.cpp's block_linear), a few rows of activations meet the same weights for 5.6x
fewer bytes.

Loading: the blocks come straight from the GGUF (the `gguf` package reads them; nothing is
re-quantized), q and k with llama.cpp's row order undone (it permutes whole rows, so every block
stays whole), q/k/v and gate/up joined as the runner joins them. Then the proof: every block is
dequantized (d * q + m, float32, as the conversion did) and compared bit for bit with the weight
the loaded model holds. If any differs (another model, or a float32 checkpoint given with
GATEWAY_MODEL), the blocks are not used, unless `weight_format: blocks` asks for them anyway,
and then the log says the model is served lossy.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.config import default_cache_dir

log = logging.getLogger("gateway")

BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
GGUF_TYPES = {"Q4_1": "q4_1", "Q8_0": "q8_0"}
LAYER_NAMES = {  # the runner's fused matrices, each the GGUF tensors it joins, in order
    "qkv": ("attn_q", "attn_k", "attn_v"),
    "o": ("attn_output",),
    "gate_up": ("ffn_gate", "ffn_up"),
    "down": ("ffn_down",),
}
HF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}  # fmt: skip


@dataclass
class StoredWeight:
    blocks: torch.Tensor  # [out features, in features / 32 * block bytes] uint8, row-major
    kind: str  # "q4_1" | "q8_0"

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()


def find_gguf(model_path: Path) -> Path | None:
    """The GGUF file a converted model folder was made from (its SOURCE.json names it)."""
    source = model_path / "SOURCE.json"
    if not source.exists():
        return None
    name = Path(json.loads(source.read_text())["gguf"]).name
    path = default_cache_dir() / "gguf" / name
    return path if path.exists() else None


def load(path: Path, num_layers: int, heads: int, kv_heads: int) -> dict[str, StoredWeight]:
    """Every layer's fused matrices ("3.qkv", ...) and the vocabulary projection ("lm_head"),
    as blocks, in the runner's row order."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    stored = {"lm_head": _stored(tensors["token_embd.weight"])}
    for i in range(num_layers):
        for fused, parts in LAYER_NAMES.items():
            pieces = [_stored(tensors[f"blk.{i}.{part}.weight"]) for part in parts]
            for part, piece in zip(parts, pieces, strict=True):
                if part in ("attn_q", "attn_k"):  # llama.cpp's row order for rotary, undone
                    piece.blocks = unpermute(piece.blocks, heads if part == "attn_q" else kv_heads)
            kinds = {p.kind for p in pieces}
            if len(kinds) != 1:
                raise ValueError(f"layer {i} {fused}: mixed block kinds {kinds}")
            stored[f"{i}.{fused}"] = StoredWeight(
                torch.cat([p.blocks for p in pieces]), kinds.pop()
            )
    return stored


def _stored(tensor) -> StoredWeight:
    kind = GGUF_TYPES.get(tensor.tensor_type.name)
    if kind is None:
        raise ValueError(f"{tensor.name}: {tensor.tensor_type.name} blocks are not supported")
    return StoredWeight(torch.from_numpy(np.array(tensor.data)), kind)  # [rows, row bytes]


def unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of q or k rows (transformers' reverse_permute_weights)."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, -1).transpose(1, 2).reshape(rows.shape)


def dequantize(weight: StoredWeight) -> torch.Tensor:
    """The float32 weights the blocks stand for, computed as the conversion computed them."""
    raw = weight.blocks.numpy()
    blocks = raw.reshape(raw.shape[0], -1, BLOCK_BYTES[weight.kind])
    d = blocks[:, :, 0:2].copy().view(np.float16).astype(np.float32)
    if weight.kind == "q8_0":
        q = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
        return torch.from_numpy((d * q).reshape(raw.shape[0], -1))
    m = blocks[:, :, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, :, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32)
    return torch.from_numpy(((d * q) + m).reshape(raw.shape[0], -1))


def differences(stored: dict[str, StoredWeight], weights: dict[str, torch.Tensor]) -> list[str]:
    """The names whose blocks do not dequantize to the float32 weight, bit for bit."""
    bad = []
    for name, weight in stored.items():
        expected = weights[name]
        got = dequantize(weight)
        if got.shape != expected.shape or not torch.equal(
            got.view(torch.int32), expected.contiguous().view(torch.int32)
        ):
            bad.append(name)
    return bad
