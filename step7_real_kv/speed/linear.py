"""The fast matmul: the runner's `x @ weight.T` by whichever of three means is fastest there.

model_runner.Linear is the reference (F.linear). FastLinear answers the same call, [T, in] ->
[T, out], and chooses per call by the number of rows T:

- up to BLOCK_ROWS rows, where the model's stored blocks are its weights bit for bit:
  cpu_kernels.cpp's block_linear over the GGUF's Q4_1/Q8_0 blocks (stored_weights.py), 5.6x
  fewer bytes than float32;
- else up to SMALL_ROWS rows: small_linear, a row-wise dot product over the float32 weight;
- else, on a CPU in float32 with backend "auto": oneDNN, the weight reordered once, at
  start-up, into the blocked layout its kernels read (as torch.compile's weight freezing and
  vLLM's CPU backend do); MKL's sgemm behind F.linear took about twice as long at this model's
  shapes (the README's profile);
- else F.linear, as the reference.

A few rows make a matmul a stream over the weight, so its bytes set the speed; many rows make
it matrix work, where oneDNN's blocking pays. Every path sums in another order than F.linear,
so the last bits of a product differ; the weights themselves are the same.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from step7_real_kv.speed.stored_weights import StoredWeight, differences


class FastLinear:
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

    def path(self, rows: int) -> str:
        """The path a call of `rows` rows takes (the choice __call__ makes), by name."""
        if self.block is not None and self.stored is not None and rows <= self.BLOCK_ROWS:
            return f"{self.stored.kind} blocks"
        if self.small is not None and rows <= self.SMALL_ROWS:
            return "small_linear"
        return "oneDNN float32" if self.packed is not None else "F.linear"


def fast_linears(
    weights: dict[str, torch.Tensor],
    backend: str,
    batch_hint: int,
    kernels: ModuleType | None,
    stored: dict[str, StoredWeight] | None,
    lossy_ok: bool,
) -> tuple[dict[str, FastLinear], list[str]]:
    """A FastLinear for each of the runner's matrices ("lm_head", "3.qkv", ...), and the names
    whose stored blocks are not the float32 weight bit for bit. Where any differs, no matrix
    reads blocks (float32 for them all), unless `lossy_ok` (weight_format=blocks) asks for them
    anyway."""
    pieces = {name: stored[name] for name in weights if stored and name in stored}
    lossy = differences(pieces, weights)
    if lossy and not lossy_ok:
        pieces = {}
    linears = {
        name: FastLinear(weight, backend, batch_hint, kernels, pieces.get(name))
        for name, weight in weights.items()
    }
    return linears, lossy


def describe(first: FastLinear, linears: list[FastLinear], lossy: bool) -> str:
    """The matmul paths, for the start-up log and gateway_engine_info: the large-batch path,
    then the few-rows one (e.g. "onednn+q4_1/q8_0_blocks(<=8 rows)")."""
    matmul = "onednn" if first.packed is not None else "torch"
    kinds = "/".join(sorted({m.stored.kind for m in linears if m.stored}))
    if kinds:
        return f"{matmul}+{kinds}_blocks(<={FastLinear.BLOCK_ROWS} rows)" + (
            "_lossy" if lossy else ""
        )
    if first.small is not None:
        return f"{matmul}+small_linear(<={FastLinear.SMALL_ROWS} rows)"
    return matmul
