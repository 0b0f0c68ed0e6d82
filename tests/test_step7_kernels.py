"""Step 7's C++ kernels (speed/cpu_kernels.cpp) as guests with manners: each equals the torch
code it replaces, refuses bad input with its own message before it reads or writes anything,
releases the GIL while it runs, and is built once: a later load finds the build and compiles
nothing, and a build that cannot happen fails clearly where the kernels were required."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from step7_real_kv.paged_kv import PagedKVCache, slot_numbers
from step7_real_kv.speed import cpu_kernels, once
from step7_real_kv.speed.linear import FastLinear
from step7_real_kv.speed.stored_weights import (
    BLOCK_BYTES,
    StoredWeight,
    dequantize,
    differences,
    find_gguf,
    load,
)
from tests.conftest import ROOT

REQUIRED = os.environ.get("GATEWAY_REQUIRE_KERNELS") == "1"


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [heads, d] over its whole context k, v [context, kv_heads, d] -> [heads, d]."""
    group = q.shape[0] // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    scores = (k @ q[:, :, None])[..., 0] / q.shape[-1] ** 0.5  # [heads, context]
    return (scores.softmax(-1)[:, None, :] @ v)[:, 0]


def scattered_pool(lengths: list[int], bs: int, kv_heads: int, dim: int):
    """A pool of random keys and values, each row's blocks scattered in it; 0-padded tables."""
    blocks_each = [-(-n // bs) for n in lengths]
    pool = PagedKVCache(1, sum(blocks_each) + 7, bs, kv_heads, dim)
    pool.k.normal_(), pool.v.normal_()
    order = torch.randperm(pool.num_blocks).tolist()
    tables, taken = [], 0
    for n in blocks_each:
        tables.append(order[taken : taken + n])
        taken += n
    widest = max(blocks_each)
    return pool, tables, torch.tensor([t + [0] * (widest - len(t)) for t in tables])


# ---------------------------------------------------------------- each equals its torch code


@pytest.mark.parametrize("bs", [4, 5, 16])
@pytest.mark.parametrize("lengths", [[1], [4, 5, 3, 9], [16, 17, 33, 64], [70, 2]])
def test_the_attention_kernel_equals_the_torch_reference(kernels, lengths, bs):
    """Scattered blocks, contexts ending at, before and across block boundaries, one token;
    blocks of fewer keys than the kernel's 8 at once, of a number that 8 does not divide, and
    of two full 8s."""
    torch.manual_seed(len(lengths))
    heads, kv_heads, dim = 9, 3, 64
    pool, tables, table_tensor = scattered_pool(lengths, bs, kv_heads, dim)
    q = torch.randn(len(lengths), heads, dim)
    out = kernels.paged_attention_rows(
        q, pool.k[0], pool.v[0], table_tensor, torch.tensor(lengths), bs, dim**-0.5
    )
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        k, v = pool.gather(0, torch.tensor(slot_numbers(table, 0, n, bs)))
        expected = one_query_attention(q[row], k, v)
        torch.testing.assert_close(out[row], expected, rtol=1e-5, atol=1e-5)


def test_the_attention_kernel_reads_row_strided_queries(kernels):
    """As the model runner passes them: q = qkv[:, :heads], rows a fused projection apart."""
    torch.manual_seed(0)
    lengths, bs, heads, kv_heads, dim = [5, 12, 1], 4, 6, 2, 32
    pool, _, tables = scattered_pool(lengths, bs, kv_heads, dim)
    qkv = torch.randn(len(lengths), heads + 2 * kv_heads, dim)
    args = (pool.k[0], pool.v[0], tables, torch.tensor(lengths), bs, dim**-0.5)
    strided = kernels.paged_attention_rows(qkv[:, :heads], *args)
    assert torch.equal(strided, kernels.paged_attention_rows(qkv[:, :heads].contiguous(), *args))


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_the_fused_norm_and_silu_kernels_equal_torch(kernels, rows):
    from step7_real_kv.model_runner import rms_norm

    torch.manual_seed(rows)
    x, delta, weight = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    expected_x = x + delta
    expected = rms_norm(expected_x, weight, 1e-5)
    normed = kernels.add_rms_norm_(x, delta, weight, 1e-5)
    assert torch.equal(x, expected_x)  # the residual add, in place, bit for bit
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-5)
    gate_up = torch.randn(rows, 2 * 1536) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    expected_mlp = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(kernels.silu_mul(gate_up), expected_mlp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_the_rope_and_store_kernel_equals_torch(kernels, tokens):
    from step7_real_kv.model_runner import rotate

    torch.manual_seed(tokens)
    heads, kv_heads, dim = 9, 3, 64
    qkv = torch.randn(tokens, heads + 2 * kv_heads, dim)
    cos, sin = torch.randn(tokens, 1, dim), torch.randn(tokens, 1, dim)
    slots = torch.randperm(64)[:tokens]
    expected = rotate(qkv[:, : heads + kv_heads], cos, sin)
    values = qkv[:, heads + kv_heads :].clone()
    pool = PagedKVCache(1, 16, 4, kv_heads, dim)
    kernels.rope_and_store_(qkv, cos.view(tokens, dim), sin.view(tokens, dim), pool.k[0],
                            pool.v[0], slots)  # fmt: skip
    torch.testing.assert_close(qkv[:, : heads + kv_heads], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pool.k[0][slots], expected[:, heads:], rtol=1e-6, atol=1e-6)
    assert torch.equal(pool.v[0][slots], values)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_the_small_linear_kernel_equals_f_linear(kernels, rows):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 576), torch.randn(960, 576)
    expected = torch.nn.functional.linear(x, weight)
    torch.testing.assert_close(kernels.small_linear(x, weight), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- bad input raises, writes nothing


def test_the_rows_of_one_chunk_read_the_pool_together_and_equal_each_row_alone(kernels):
    """A prefill chunk's (or a verification's) rows are consecutive tokens of one sequence: the
    kernel reads their keys and values once for the run (up to 8 rows), and every row's output
    is bit for bit what the kernel gives that row by itself. Runs break at another sequence,
    at a gap in the positions, and at a table that differs in a block the rows read."""
    torch.manual_seed(3)
    bs, heads, kv_heads, dim = 4, 9, 3, 64
    pool, tables, _ = scattered_pool([40, 40, 40], bs, kv_heads, dim)
    twin = list(tables[0])
    twin[2] = tables[2][2]  # equal to the first sequence's table except its third block
    rows = (
        [(tables[0], n) for n in range(28, 40)]  # 12 tokens of a chunk: runs of 8 and 4
        + [(tables[1], 7), (tables[1], 8), (tables[1], 10)]  # a gap after two
        + [(tables[0], 17), (twin, 18)]  # the same lengths' pattern, a block differs
        + [(tables[2], 1)]
    )
    width = max(len(t) for t, _ in rows)
    table_tensor = torch.tensor([list(t) + [0] * (width - len(t)) for t, _ in rows])
    lengths = torch.tensor([n for _, n in rows])
    q = torch.randn(len(rows), heads, dim)
    args = (pool.k[0], pool.v[0])
    together = kernels.paged_attention_rows(q, *args, table_tensor, lengths, bs, dim**-0.5)
    for i in range(len(rows)):
        alone = kernels.paged_attention_rows(
            q[i : i + 1], *args, table_tensor[i : i + 1], lengths[i : i + 1], bs, dim**-0.5
        )
        assert torch.equal(together[i], alone[0]), f"row {i}"
        table, n = rows[i]
        k, v = pool.gather(0, torch.tensor(slot_numbers(table, 0, n, bs)))
        expected = one_query_attention(q[i], k, v)
        torch.testing.assert_close(together[i], expected, rtol=1e-5, atol=1e-5)


def attention_args(**change):
    """Good arguments for paged_attention_rows (2 rows, 8 blocks of 4), with some replaced."""
    torch.manual_seed(0)
    pool = PagedKVCache(1, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8)
    pool.k.normal_(), pool.v.normal_()
    args = {
        "q": torch.randn(2, 4, 8),
        "k_pool": pool.k[0],
        "v_pool": pool.v[0],
        "tables": torch.tensor([[5, 2], [7, 0]]),
        "lengths": torch.tensor([6, 3]),
        "block_size": 4,
        "scale": 8**-0.5,
    }
    return list({**args, **change}.values())


def test_a_head_dim_past_the_kernels_registers_is_refused(kernels):
    pool = PagedKVCache(1, num_blocks=2, block_size=4, num_kv_heads=1, head_dim=136)
    args = (torch.randn(1, 1, 136), pool.k[0], pool.v[0], torch.tensor([[0]]), torch.tensor([2]))
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 8 up to 128, got 136"):
        kernels.paged_attention_rows(*args, 4, 136**-0.5)


def test_table_entries_past_a_rows_length_are_not_read(kernels):
    """Padding after a row's last block is never followed, so it needs no valid block id."""
    lengths = torch.tensor([4, 3])  # one block each
    padded = attention_args(tables=torch.tensor([[5, 99], [7, -1]]), lengths=lengths)
    zeros = attention_args(tables=torch.tensor([[5, 0], [7, 0]]), lengths=lengths)
    assert torch.equal(kernels.paged_attention_rows(*padded), kernels.paged_attention_rows(*zeros))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tables": torch.tensor([[5, 8], [7, 0]])},
         r"block_tables\[0\]\[1\] = 8 is outside the pool's \[0, 8\)"),
        ({"tables": torch.tensor([[5, 2], [-1, 0]])}, r"block_tables\[1\]\[0\] = -1 is outside"),
        ({"lengths": torch.tensor([9, 3])}, r"lengths\[0\] = 9 is outside \[1, 8\]"),
        ({"lengths": torch.tensor([6, 0])}, r"lengths\[1\] = 0 is outside"),
        ({"lengths": torch.tensor([6])}, "block_tables and lengths need one row per row of q"),
        ({"tables": torch.tensor([[5, 2]])}, "block_tables and lengths need one row per row of q"),
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"block_size": 3}, "slots are not a whole number of blocks"),
        ({"q": torch.randn(2, 4, 8, dtype=torch.float64)}, "q must be float32, got float64"),
        ({"q": torch.randn(2, 3, 8)}, "3 heads must be a multiple of the pool's 2 kv heads"),
        ({"q": torch.randn(2, 4, 16)}, "head_dim 16 differs from the pool's 8"),
        ({"q": torch.randn(2, 8, 4).transpose(1, 2)}, "each row of q must hold its heads"),
        ({"q": torch.randn(2, 32)}, "q must be 3-D"),
        ({"k_pool": torch.zeros(8, 32, 2).transpose(1, 2)}, "k_pool must be contiguous"),
        ({"v_pool": torch.zeros(16, 2, 8)}, "k_pool and v_pool must have the same shape"),
        ({"tables": torch.tensor([[5, 2], [7, 0]]).int()}, "block_tables must be int64, got int32"),
        ({"lengths": torch.tensor([[6, 3]])}, "lengths must be 1-D"),
        ({"tables": torch.tensor([[5, 7], [2, 0]]).t()}, "block_tables must be contiguous"),
    ],
)  # fmt: skip
def test_paged_attention_refuses_bad_input(kernels, change, message):
    with pytest.raises(RuntimeError, match=f"^paged_attention_rows: .*{message}"):
        kernels.paged_attention_rows(*attention_args(**change))


def rope_args(**change):
    """Good arguments for rope_and_store_ (3 tokens, a pool of 16 slots), some replaced."""
    heads, kv_heads, dim, tokens = 4, 2, 8, 3
    pool = PagedKVCache(1, num_blocks=4, block_size=4, num_kv_heads=kv_heads, head_dim=dim)
    args = {
        "qkv": torch.randn(tokens, heads + 2 * kv_heads, dim),
        "cos": torch.randn(tokens, dim),
        "sin": torch.randn(tokens, dim),
        "k_pool": pool.k[0],
        "v_pool": pool.v[0],
        "slots": torch.tensor([3, 15, 0]),
    }
    return list({**args, **change}.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slots": torch.tensor([3, 16, 0])}, r"slots\[1\] = 16 is outside the pool's \[0, 16\)"),
        ({"slots": torch.tensor([3, 15, -1])}, r"slots\[2\] = -1 is outside"),
        ({"slots": torch.tensor([3, 15])}, r"slots needs one slot per token \(3\), got 2"),
        ({"slots": torch.tensor([3, 15, 0], dtype=torch.int32)}, "slots must be int64"),
        ({"qkv": torch.randn(3, 8, 8, dtype=torch.float64)}, "qkv must be float32"),
        ({"qkv": torch.randn(8, 3, 8).transpose(0, 1)}, "qkv must be contiguous"),
        ({"qkv": torch.randn(3, 7, 8)}, "qkv's 7 heads must be q heads \\+ 2 \\* 2 kv heads"),
        ({"qkv": torch.randn(3, 8, 16)}, "qkv's head_dim 16 differs from the pool's 8"),
        ({"cos": torch.randn(2, 8)}, r"cos and sin must be \[3, 8\]"),
        ({"sin": torch.randn(8, 3).t()}, "sin must be contiguous"),
        ({"v_pool": torch.zeros(16, 2, 8)[:, :1]}, "v_pool must be contiguous"),
    ],
)  # fmt: skip
def test_rope_and_store_refuses_bad_input_and_writes_nothing(kernels, change, message):
    args = rope_args(**change)
    before = [a.clone() for a in args]
    with pytest.raises(RuntimeError, match=f"^rope_and_store_: .*{message}"):
        kernels.rope_and_store_(*args)
    for arg, old in zip(args, before, strict=True):  # neither qkv rotated nor the pool written
        assert torch.equal(arg, old)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weight": torch.randn(12)}, "weight has 12 elements, x's hidden size is 16"),
        ({"weight": torch.randn(16, dtype=torch.float64)}, "weight must be float32, got float64"),
        ({"weight": torch.randn(16, 2)[:, 0]}, "weight must be contiguous"),
        ({"weight": torch.randn(1, 16)}, "weight must be 1-D"),
        ({"delta": torch.randn(3, 16)}, "x and delta must have the same shape"),
        ({"delta": torch.randn(16, 2).t()}, "delta must be contiguous"),
        ({"x": torch.randn(2, 16).to(torch.bfloat16)}, "x must be float32, got bfloat16"),
        ({"x": torch.randn(2, 12), "delta": torch.randn(2, 12), "weight": torch.randn(12)},
         "hidden size must be a multiple of 8, got 12"),
    ],
)  # fmt: skip
def test_add_rms_norm_refuses_bad_input_and_adds_nothing(kernels, change, message):
    args = {"x": torch.randn(2, 16), "delta": torch.randn(2, 16), "weight": torch.randn(16)}
    args.update(change)
    x = args["x"].clone()
    with pytest.raises(RuntimeError, match=f"^add_rms_norm_: .*{message}"):
        kernels.add_rms_norm_(args["x"], args["delta"], args["weight"], 1e-5)
    assert torch.equal(args["x"], x)


@pytest.mark.parametrize(
    "gate_up, message",
    [
        (torch.randn(2, 7), "gate_up's width must be even"),
        (torch.randn(8, 2).t(), "gate_up must be contiguous"),
        (torch.randn(2, 8, dtype=torch.float64), "gate_up must be float32"),
        (torch.randn(8), "gate_up must be 2-D"),
    ],
)
def test_silu_mul_refuses_bad_input(kernels, gate_up, message):
    with pytest.raises(RuntimeError, match=f"^silu_mul: .*{message}"):
        kernels.silu_mul(gate_up)


@pytest.mark.parametrize(
    "x, w, message",
    [
        (torch.randn(2, 64), torch.randn(5, 32), "x has 64 in features, w has 32"),
        (torch.randn(2, 48), torch.randn(5, 48), "in features must be a multiple of 32, got 48"),
        (torch.randn(64, 2).t(), torch.randn(5, 64), "x must be contiguous"),
        (torch.randn(2, 64), torch.randn(64, 5).t(), "w must be contiguous"),
        (torch.randn(2, 64), torch.randn(5, 64, dtype=torch.float64), "w must be float32"),
    ],
)
def test_small_linear_refuses_bad_input(kernels, x, w, message):
    with pytest.raises(RuntimeError, match=f"^small_linear: .*{message}"):
        kernels.small_linear(x, w)


# ---------------------------------------------------------------- each releases the GIL


def longest_stall(call: Callable[[], object]) -> float:
    """Runs `call` on a thread while this thread spins: the longest this thread went without
    running, in seconds. Were the GIL held through the call, that would be the whole call;
    released, this thread keeps running on the other core."""
    thread = threading.Thread(target=call)
    last, longest = time.perf_counter(), 0.0
    thread.start()
    while thread.is_alive():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    thread.join()
    return longest


def seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


@pytest.fixture
def one_torch_thread():
    """The kernel on one core, this thread on the other (the machine may have only two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def long_call(k, name: str) -> Callable[[], object]:
    """One call of a kernel that takes tens of milliseconds (inputs of at most ~250 MB)."""
    if name == "small_linear":
        x, w = torch.randn(256, 1024), torch.randn(8192, 1024)  # 4 GFLOP
        return lambda: k.small_linear(x, w)
    if name == "paged_attention_rows":  # 512 rows over the same 2048 tokens of 128 blocks
        pool = torch.randn(2048, 2, 64), torch.randn(2048, 2, 64)
        tables, lengths = torch.arange(128).repeat(512, 1), torch.full((512,), 2048)
        q = torch.randn(512, 8, 64)
        return lambda: k.paged_attention_rows(q, *pool, tables, lengths, 16, 0.125)
    if name == "rope_and_store_":
        t = 32768
        qkv, cos, sin = torch.randn(t, 12, 128), torch.randn(t, 128), torch.randn(t, 128)
        k_pool, v_pool, slots = torch.zeros(t, 2, 128), torch.zeros(t, 2, 128), torch.arange(t)
        return lambda: k.rope_and_store_(qkv, cos, sin, k_pool, v_pool, slots)
    if name == "add_rms_norm_":
        x, delta, weight = torch.randn(16384, 1024), torch.randn(16384, 1024), torch.randn(1024)
        return lambda: k.add_rms_norm_(x, delta, weight, 1e-5)
    if name == "block_linear":
        x, weight = torch.randn(8, 4096), random_blocks("q4_1", 32768, 4096)
        return lambda: k.block_linear(x, weight.blocks, weight.kind)
    gate_up = torch.randn(8192, 4096)
    return lambda: k.silu_mul(gate_up)


def stall_ratio(call: Callable[[], object], attempts: int = 5) -> float:
    """The longest stall while `call` runs on a thread, over the time the call takes alone: about
    1 when it holds the GIL, near 0 when it lets go. The best of a few tries: a loaded machine
    pauses this thread now and then, a held GIL pauses it every time."""
    alone = sorted(seconds(call) for _ in range(3))[1]  # the first also warms up
    ratios: list[float] = []
    while len(ratios) < attempts and min(ratios, default=1.0) >= 0.25:
        ratios.append(longest_stall(call) / alone)
    return min(ratios)


@pytest.mark.parametrize(
    "name",
    ["small_linear", "block_linear", "paged_attention_rows", "rope_and_store_", "add_rms_norm_",
     "silu_mul"],
)  # fmt: skip
def test_each_kernel_releases_the_gil(kernels, one_torch_thread, name):
    assert stall_ratio(long_call(kernels, name)) < 0.5


def test_the_stall_probe_sees_a_held_gil(one_torch_thread):
    """The probe's control: sum over a range is one C call that never lets go of the GIL."""
    assert stall_ratio(lambda: sum(range(10_000_000)), attempts=1) > 0.5


# ---------------------------------------------------------------- built once, then only loaded


def python(code: str, cwd=ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs `code` in a fresh interpreter, this repository importable, env vars added."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    run = subprocess.run
    return run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_fresh_process_loads_the_build_and_compiles_nothing(kernels, tmp_path):
    """From another directory, with a compiler that would fail: it loads the .so as it is."""
    library = cpu_kernels.library_path()
    built = library.stat().st_mtime_ns
    code = (
        "import sys, time; started = time.monotonic()\n"
        "from step7_real_kv.speed import cpu_kernels\n"
        "assert cpu_kernels.load(required=True) is not None\n"
        "print(time.monotonic() - started, 'torch.utils.cpp_extension' in sys.modules)"
    )
    done = python(code, cwd=tmp_path, CXX="/bin/false")  # a build would fail
    assert done.returncode == 0, done.stderr
    seconds, used_cpp_extension = done.stdout.split()
    assert used_cpp_extension == "False"  # neither ninja nor the compiler was asked
    assert float(seconds) < 10  # a build takes half a minute or more
    assert library.stat().st_mtime_ns == built


def test_the_build_key_follows_the_source_the_flags_and_the_target_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv(cpu_kernels.MARCH_ENV, raising=False)
    native = cpu_kernels.build_key()
    assert cpu_kernels.build_key("native") == native
    assert cpu_kernels.build_key("x86-64-v3") != native
    monkeypatch.setenv(cpu_kernels.MARCH_ENV, "x86-64-v3")
    assert cpu_kernels.build_key() == cpu_kernels.build_key("x86-64-v3")
    assert cpu_kernels.build_key() in str(cpu_kernels.library_path())
    assert "-march=x86-64-v3" in cpu_kernels.compile_flags(cpu_kernels.march())
    edited = tmp_path / "cpu_kernels.cpp"
    edited.write_bytes(cpu_kernels.SOURCE.read_bytes() + b"// one more line\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", edited)
    assert cpu_kernels.build_key("native") != native


def test_a_march_that_is_not_one_is_refused(monkeypatch):
    monkeypatch.setenv(cpu_kernels.MARCH_ENV, "native -fplugin=evil.so")
    with pytest.raises(ValueError, match="GATEWAY_KERNELS_MARCH"):
        cpu_kernels.march()


def test_a_build_that_cannot_happen_fails_clearly_when_required(tmp_path):
    """No ahead-of-time build in an empty cache, and a compiler that fails."""
    broken = {"CXX": "/bin/false", "GATEWAY_CACHE_DIR": str(tmp_path)}
    code = (
        "from step7_real_kv.speed import cpu_kernels\n"
        "assert cpu_kernels.load() is None\n"
        "cpu_kernels.load(required=True)"
    )
    done = python(code, **broken)
    assert done.returncode == 1
    assert "RuntimeError: step 7's C++ kernels are required but could not be" in done.stderr
    assert "install a C++ compiler" in done.stderr
    assert "python -m step7_real_kv.speed.cpu_kernels" in done.stderr
    assert "using the torch code" in done.stderr  # the optional load() only warned
    build_ahead = "from step7_real_kv.speed.cpu_kernels import main; raise SystemExit(main())"
    ahead = python(build_ahead, **broken)
    assert ahead.returncode == 1
    assert "failed to build or load" in ahead.stderr


# ---------------------------------------------------------------- weights as GGUF stores them


def random_blocks(kind: str, out: int, inputs: int, seed: int = 0) -> StoredWeight:
    """Blocks as GGUF lays them out, with random scales (float16) and quants."""
    rng = np.random.default_rng(seed)
    size = BLOCK_BYTES[kind]
    raw = rng.integers(0, 256, size=(out, inputs // 32, size), dtype=np.uint8)
    scales = rng.normal(0, 0.02, size=(out, inputs // 32, 2)).astype(np.float16)
    raw[:, :, 0:2] = scales[:, :, :1].view(np.uint8)
    if kind == "q4_1":
        raw[:, :, 2:4] = (-8 * np.abs(scales[:, :, 1:])).astype(np.float16).view(np.uint8)
    return StoredWeight(torch.from_numpy(raw.reshape(out, -1).copy()), kind)


# 1 .. one past the default switch to oneDNN, and the multi-pass counts a measured switch uses
ROWS = [*range(1, FastLinear.BLOCK_ROWS + 2), 16, 17]
# Odd: the kernel computes weight rows in pairs at a few rows of x, and the last one alone.
OUT = 201


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", ROWS)
def test_the_block_kernel_makes_the_float32_weights_bit_for_bit(kernels, kind, rows):
    """The claim: each weight the kernel makes from a block is the float32 copy's weight, bit
    for bit (Q4_1: d * q + m, rounded once at the add, since d * q is exact in float32: see
    speed/cpu_kernels.py). A one-hot row of x reads one weight out unchanged: 1 * w is w, and the
    other products are zeros, which add nothing. So x = I gives W.T, weight by weight."""
    weight = random_blocks(kind, OUT, 576, seed=rows)
    eye = torch.eye(576)
    got = torch.cat([kernels.block_linear(x, weight.blocks, kind) for x in eye.split(rows)])
    assert torch.equal(got.t(), dequantize(weight))


def inner_product_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far a float32 sum of the n products x_j * w_j may be from the exact sum, whatever
    the order of the sums and wherever an FMA fuses a product in: gamma_n * sum_j |x_j * w_j|,
    gamma_n = n u / (1 - n u), u = 2^-24 (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., section 3.1), plus the same for the float64 reference. [rows, out]."""
    n = x.shape[1]

    def gamma(u: float) -> float:
        return n * u / (1 - n * u)

    return (gamma(2.0**-24) + gamma(2.0**-53)) * (x.double().abs() @ w.double().abs().T)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("rows", ROWS)
def test_the_block_kernels_product_differs_only_by_the_order_of_its_sums(kernels, kind, rows):
    """With the weights exact (above), the product is a float32 inner product of the exact
    weights, so it is within the bound of any summation order of the exact product; F.linear
    (another order) is held to the same bound. Here it is about 2% of one product's size: a
    product lost or doubled, or a row mixed up, is far outside it."""
    weight = random_blocks(kind, OUT, 576, seed=rows)
    w = dequantize(weight)
    x = torch.randn(rows, 576)
    exact = x.double() @ w.double().T
    bound = inner_product_bound(x, w)
    got = kernels.block_linear(x, weight.blocks, kind)
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((torch.nn.functional.linear(x, w).double() - exact).abs() <= bound).all()


@pytest.mark.parametrize(
    "x, make, message",
    [
        (torch.randn(2, 100), lambda: random_blocks("q4_1", 4, 96), "multiple of 32"),
        (torch.randn(2, 64), lambda: random_blocks("q4_1", 4, 96), "bytes a row"),
        (torch.randn(2, 64), lambda: random_blocks("q8_0", 4, 64), "q4_1 or q8_0"),
        (torch.randn(2, 64, dtype=torch.float64), lambda: random_blocks("q4_1", 4, 64),
         "float32"),
        (torch.randn(64, 2).t(), lambda: random_blocks("q4_1", 4, 64), "contiguous"),
    ],
)  # fmt: skip
def test_the_block_kernel_refuses_odd_sizes_and_kinds(kernels, x, make, message):
    weight = make()
    kind = "q5_k" if message == "q4_1 or q8_0" else weight.kind
    with pytest.raises(RuntimeError, match=message):
        kernels.block_linear(x, weight.blocks, kind)
    with pytest.raises(RuntimeError, match="uint8"):
        kernels.block_linear(torch.randn(2, 64), torch.zeros(4, 40, dtype=torch.int8), "q4_1")


@pytest.fixture(scope="module")
def gguf_path(real_model_dir):
    path = find_gguf(real_model_dir)
    if path is None:
        pytest.fail(f"no GGUF beside {real_model_dir}: `python -m common.model fetch` keeps it")
    return path


def test_the_real_blocks_are_the_models_weights_bit_for_bit(gguf_path, real_model_dir):
    from common.config import ServerConfig
    from common.model import load_model

    lm = load_model(ServerConfig(model=str(real_model_dir)))
    c = lm.config
    stored = load(gguf_path, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    params = dict(lm.model.named_parameters(remove_duplicate=False))
    p = lambda name: params[f"model.layers.{name}.weight"]  # noqa: E731
    fused = {"lm_head": params["model.embed_tokens.weight"]}
    for i in range(c.num_hidden_layers):
        fused[f"{i}.qkv"] = torch.cat([p(f"{i}.self_attn.{n}_proj") for n in "qkv"])
        fused[f"{i}.o"] = p(f"{i}.self_attn.o_proj")
        fused[f"{i}.gate_up"] = torch.cat([p(f"{i}.mlp.gate_proj"), p(f"{i}.mlp.up_proj")])
        fused[f"{i}.down"] = p(f"{i}.mlp.down_proj")
    assert set(stored) == set(fused) and len(stored) == 4 * c.num_hidden_layers + 1
    assert differences(stored, fused) == []
    total = sum(w.nbytes for w in stored.values())
    assert 90e6 < total < 100e6  # 96 MB of blocks for 538 MB of float32
    perturbed = dict(fused)  # one float32 weight off by one bit: the proof must say so
    changed = fused["3.down"].clone()
    changed.view(torch.int32)[5, 7] ^= 1
    perturbed["3.down"] = changed
    assert differences(stored, perturbed) == ["3.down"]


def test_a_runner_refuses_blocks_that_are_not_its_weights(kernels, tiny_model_dir):
    """The tiny random model against blocks of another model: not lossless, so not used (auto),
    unless asked for (then said to be lossy)."""
    from common.config import ServerConfig
    from common.model import load_model
    from step7_real_kv.model_runner import ModelRunner
    from step7_real_kv.paged_kv import PagedKVCache

    lm = load_model(ServerConfig(model=str(tiny_model_dir)))
    kv = PagedKVCache.for_model(lm, 8, 4)
    head = lm.model.get_output_embeddings().weight
    stored = {"lm_head": random_blocks("q8_0", head.shape[0], head.shape[1])}
    auto = ModelRunner(lm, kv, "auto", kernels, 8, stored)
    assert auto.lossy == ["lm_head"] and auto.lm_head.stored is None
    assert "blocks" not in auto.backends["linear"]
    forced = ModelRunner(lm, kv, "auto", kernels, 8, stored, lossy=True)
    assert forced.lm_head.stored is not None and forced.backends["linear"].endswith("_lossy")


def test_a_configured_switch_row_count_is_the_runners(kernels, tiny_model_dir):
    """block_rows = 12: up to 12 rows by the blocks, 13 by oneDNN, and the engine says so."""
    from common.config import ServerConfig
    from common.model import load_model
    from step7_real_kv.model_runner import ModelRunner
    from step7_real_kv.paged_kv import PagedKVCache

    lm = load_model(ServerConfig(model=str(tiny_model_dir)))
    kv = PagedKVCache.for_model(lm, 8, 4)
    head = lm.model.get_output_embeddings().weight
    stored = {"lm_head": random_blocks("q8_0", head.shape[0], head.shape[1])}
    runner = ModelRunner(lm, kv, "auto", kernels, 8, stored, lossy=True, block_rows=12)
    assert runner.lm_head.path(12) == "q8_0 blocks" and runner.lm_head.path(13) == "oneDNN float32"
    assert "blocks(<=12 rows)" in runner.backends["linear"]


class TimedLinear(FastLinear):
    """A matrix whose two ways cost what the test says, on a clock the test moves."""

    def __init__(self, clock: list[float], blocks_ms_per_row: float, onednn_ms: float) -> None:
        self.clock, self.per_row, self.onednn_ms = clock, blocks_ms_per_row, onednn_ms
        self.weight = torch.zeros(4, 32)
        self.block_rows = self.BLOCK_ROWS

    both_ways = True

    def by_blocks(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.per_row * x.shape[0] / 1000
        return x

    def by_onednn(self, x: torch.Tensor) -> torch.Tensor:
        self.clock[0] += self.onednn_ms / 1000
        return x


@pytest.mark.parametrize(
    ("per_row", "onednn_ms", "expected"),
    [(1.0, 20.0, 16), (1.0, 9.0, 8), (0.5, 20.0, 32), (1.0, 2.0, 1)],
)
def test_the_switch_is_where_the_blocks_stop_beating_onednn(
    monkeypatch, per_row, onednn_ms, expected
):
    """measure_block_rows times both ways at each candidate row count and keeps the blocks up to
    the last count where they were no slower; one row always reads the blocks."""
    from step7_real_kv.speed import linear

    clock = [0.0]
    monkeypatch.setattr(linear.time, "perf_counter", lambda: clock[0])
    once.forget()  # measured here, not remembered from before
    matrices = [TimedLinear(clock, per_row, onednn_ms) for _ in range(3)]
    assert linear.measure_block_rows(matrices) == expected
    linear.set_block_rows(matrices, 0)  # 0: measured
    assert {m.block_rows for m in matrices} == {expected}
    once.forget()


def test_the_switch_is_measured_once_a_process(monkeypatch):
    """A second engine on the same matrices and threads takes the first's row count (step 10's
    local pair, the tests); other shapes or another thread count are measured anew; a count
    given in the configuration is not measured at all."""
    from step7_real_kv.speed import linear

    once.forget()
    calls = []

    def fake_measure(matrices):
        calls.append([m.weight.shape for m in matrices])
        return 8 + len(calls)

    monkeypatch.setattr(linear, "measure_block_rows", fake_measure)
    first = [TimedLinear([0.0], 1.0, 20.0) for _ in range(2)]
    second = [TimedLinear([0.0], 1.0, 20.0) for _ in range(2)]
    assert linear.set_block_rows(first, 0) == 9
    assert linear.set_block_rows(second, 0) == 9 and {m.block_rows for m in second} == {9}
    assert len(calls) == 1
    wider = [TimedLinear([0.0], 1.0, 20.0) for _ in range(3)]
    assert linear.set_block_rows(wider, 0) == 10  # another set of matrices: measured
    assert linear.set_block_rows(first, 5) == 5 and len(calls) == 2  # configured: not measured
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        assert linear.set_block_rows(first, 0) == 11  # another thread count: measured
    finally:
        torch.set_num_threads(threads)
    once.forget()
