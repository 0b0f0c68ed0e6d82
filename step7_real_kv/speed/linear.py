"""The fast matmul: the runner's `x @ weight.T` by whichever of three means is fastest there.

model_runner.Linear is the reference (F.linear). FastLinear answers the same call, [T, in] ->
[T, out], and chooses per call by the number of rows T:

- up to `block_rows` rows, where the model's stored blocks are its weights bit for bit:
  cpu_kernels.cpp's block_linear over the GGUF's Q4_1/Q8_0 blocks (stored_weights.py), 5.6x
  fewer bytes than float32. Where the blocks stop beating oneDNN depends on the CPU and on the
  threads (about 14 rows on a 2-core AMD EPYC, past 24 on a busy 2-core Intel with AMX), so
  it is measured at start-up (`measure_block_rows`), unless a number is configured;
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

import time
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

from step7_real_kv.speed.once import once
from step7_real_kv.speed.stored_weights import StoredWeight, differences


class FastLinear:
    SMALL_ROWS = 4  # up to this many rows, small_linear (measured: README)
    BLOCK_ROWS = 8  # up to this many rows, block_linear, until measure_block_rows says

    def __init__(
        self,
        weight: torch.Tensor,
        backend: str,
        batch_hint: int,
        kernels: ModuleType | None,
        stored: StoredWeight | None = None,
    ) -> None:
        self.weight = weight  # [out, in]
        self.block_rows = self.BLOCK_ROWS
        self.packed: torch.Tensor | None = None
        self.small = kernels.small_linear if kernels and weight.shape[1] % 32 == 0 else None
        self.stored = stored if kernels is not None else None
        self.block = kernels.block_linear if kernels is not None and stored is not None else None
        on_cpu = weight.device.type == "cpu" and weight.dtype == torch.float32
        if backend == "auto" and on_cpu and torch.backends.mkldnn.enabled:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.block is not None and self.stored is not None and rows <= self.block_rows:
            return self.by_blocks(x)
        if self.small is not None and rows <= self.SMALL_ROWS:
            return self.small(x, self.weight)
        if self.packed is None:
            return F.linear(x, self.weight)
        return self.by_onednn(x)

    def by_blocks(self, x: torch.Tensor) -> torch.Tensor:
        assert self.block is not None and self.stored is not None
        return self.block(x, self.stored.blocks, self.stored.kind)

    def by_onednn(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    @property
    def both_ways(self) -> bool:
        """The stored blocks and oneDNN's float32 can both answer: the choice is a measurement."""
        return self.block is not None and self.stored is not None and self.packed is not None

    def path(self, rows: int) -> str:
        """The path a call of `rows` rows takes (the choice __call__ makes), by name."""
        if self.block is not None and self.stored is not None and rows <= self.block_rows:
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
        return f"{matmul}+{kinds}_blocks(<={first.block_rows} rows)" + ("_lossy" if lossy else "")
    if first.small is not None:
        return f"{matmul}+small_linear(<={FastLinear.SMALL_ROWS} rows)"
    return matmul


# ---------------------------------------------------------------- where the blocks stop paying

CANDIDATE_ROWS = (8, 12, 16, 24, 32)


def time_paths(matrices: Sequence[FastLinear], rows: int, repeats: int) -> dict[str, float]:
    """ms for `rows` rows through every matrix, one after another as a forward pass reads them
    (so each weight comes from memory, not from a warm cache), by the stored blocks and by
    oneDNN, the two alternating (a machine's speed drifts): the median of `repeats`."""
    xs = [torch.randn(rows, m.weight.shape[1]) for m in matrices]
    times: dict[str, list[float]] = {"blocks": [], "onednn": []}
    for _ in range(repeats):
        for path, samples in times.items():
            start = time.perf_counter()
            for m, x in zip(matrices, xs, strict=True):
                m.by_blocks(x) if path == "blocks" else m.by_onednn(x)
            samples.append(1000 * (time.perf_counter() - start))
    return {path: sorted(v)[len(v) // 2] for path, v in times.items()}


def measure_block_rows(
    matrices: Sequence[FastLinear], candidates: Sequence[int] = CANDIDATE_ROWS, repeats: int = 3
) -> int:
    """The most rows up to which the stored blocks beat oneDNN here, with the threads the
    engine runs: the candidates in order, until oneDNN is faster (the blocks' cost grows with
    the rows, oneDNN's hardly: past the crossing the blocks do not win again). About a second
    at start-up on the real model."""
    matrices = [m for m in matrices if m.both_ways]
    if not matrices:
        return FastLinear.BLOCK_ROWS  # nothing to compare: the default
    best = 1  # one row: the blocks read 5.6x fewer bytes, and nothing else runs
    for rows in candidates:
        ms = time_paths(matrices, rows, repeats)
        if ms["blocks"] > ms["onednn"]:
            break
        best = rows
    return best


def set_block_rows(linears: list[FastLinear], rows: int) -> int:
    """Every matrix switches from the blocks to oneDNN past `rows` rows, or past the rows
    measured here when `rows` is 0: `linears` in the forward's order, so that each is timed
    reading from memory as a forward reads it. Measured once a process for each thread count
    and set of matrices (once.py)."""
    if not rows:
        kinds = [getattr(getattr(m, "stored", None), "kind", None) for m in linears]
        shapes = tuple(zip((tuple(m.weight.shape) for m in linears), kinds, strict=True))

        def measure() -> int:
            with torch.inference_mode():
                return measure_block_rows(linears)

        rows = once(("block_rows", torch.get_num_threads(), shapes), measure)
    for m in linears:
        m.block_rows = rows
    return rows
