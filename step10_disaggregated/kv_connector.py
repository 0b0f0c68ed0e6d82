"""The KV connector: how a prompt's KV blocks move from the engine that prefilled them to the
engine that decodes.

The decode engine pulls: it asks its own prefix cache first, then asks the prefill engine for the
blocks after the ones it already holds (`fetch(params, skip)`), and tells it when it is done with
them (`release(params)`), so the prefill engine can free them (leases.py). That is the shape of
vLLM's NixlConnector (the decode side reads the prefill side's memory, then notifies it) and of
a shared-storage connector (the decode side reads what the prefill side saved).

What moves is `KVBlocks`: the blocks' names (their chained hashes, common/prefix.py) and their
keys and values in every layer. The names let the decode engine check it is being given the
prompt it asked for, and are what it names the blocks by in its prefix cache.

Two transports answer the same `KVConnector` protocol: `LocalConnector` reads another engine of
the same process (the tests, and the simplest real implementation), and `encode`/`decode` below
are the wire format that the HTTP transport (http_connector.py) sends over a socket.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from step10_disaggregated.engine import DisaggEngine

TransferParams = dict[str, Any]  # kv_transfer_params, as vLLM's disaggregation proxy names them


class TransferError(RuntimeError):
    """The blocks could not be had: the prefill engine is gone, the lease expired, a bad reply."""


@dataclass
class KVBlocks:
    names: list[bytes]  # the chained hash of each block's tokens
    k: torch.Tensor  # [layers, blocks * block_size, kv_heads, head_dim]
    v: torch.Tensor  # the same shape

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class KVConnector(Protocol):
    async def fetch(self, params: TransferParams, skip: int) -> KVBlocks:
        """The handed-over blocks after the first `skip` (which the caller already holds)."""
        ...

    async def release(self, params: TransferParams, how: str) -> None:
        """The caller is done with the blocks (`how`: confirmed, taken in; cancelled, not
        wanted): free them there."""
        ...


class LocalConnector:
    """KVConnector to engines of this process, found by their engine id."""

    def __init__(self, *engines: DisaggEngine) -> None:
        self.engines = {engine.engine_id: engine for engine in engines}

    def _leases(self, params: TransferParams):
        engine = self.engines.get(params.get("remote_engine_id", ""))
        if engine is None:
            raise TransferError(f"no engine {params.get('remote_engine_id')!r}")
        return engine.leases

    async def fetch(self, params: TransferParams, skip: int) -> KVBlocks:
        return self._leases(params).read(params["remote_request_id"], skip)

    async def release(self, params: TransferParams, how: str) -> None:
        self._leases(params).release(params["remote_request_id"], how)


# ---------------------------------------------------------------- the wire format
#
# One message: a 4-byte little-endian length, a JSON header (the blocks' names in hex, the shape
# of the keys, the dtype) padded with spaces to a multiple of 64 bytes, then the keys' raw bytes,
# then the values' (each a C-contiguous tensor of the header's shape and dtype). The padding puts
# the tensors on aligned offsets, so the receiver can use them where they lie in the buffer it
# read the message into, without copying them out.

_HEADER = struct.Struct("<I")  # the length of the JSON header that follows, in bytes
_ALIGN = 64


def encode(blocks: KVBlocks) -> list[memoryview]:
    """The message in parts (header, keys, values), to be sent one after the other: the keys
    and values are views of the tensors' own memory, not copies."""
    head = header(blocks.names, list(blocks.k.shape), blocks.k.dtype)
    return [memoryview(head), _raw(blocks.k), _raw(blocks.v)]


def header(names: list[bytes], shape: list[int], dtype: torch.dtype) -> bytes:
    """The message's start: the length, then the JSON header padded so the keys that follow
    it lie on an aligned offset."""
    text = json.dumps(
        {
            "names": [n.hex() for n in names],
            "shape": shape,
            "dtype": str(dtype).removeprefix("torch."),
        }
    ).encode()
    text += b" " * (-(_HEADER.size + len(text)) % _ALIGN)
    return _HEADER.pack(len(text)) + text


def remove_file(path: str) -> None:
    """Unlink a shared-memory message, if its reader has not already."""
    with suppress(FileNotFoundError):
        os.unlink(path)


def _raw(t: torch.Tensor) -> memoryview:
    """A tensor's bytes, flat; no copy when it is contiguous already."""
    return t.contiguous().view(-1).view(torch.uint8).numpy().data


def decode(message: bytes | bytearray | mmap.mmap) -> KVBlocks:
    """`encode`'s inverse; a message of the wrong length raises TransferError. The keys and
    values are views into `message` when it is writable memory (a bytearray, a mapped file),
    into a copy of it otherwise."""
    buffer = message if isinstance(message, bytearray | mmap.mmap) else bytearray(message)
    try:
        (length,) = _HEADER.unpack_from(buffer)
        header = json.loads(buffer[_HEADER.size : _HEADER.size + length])
        dtype, shape = getattr(torch, header["dtype"]), header["shape"]
        count = math.prod(shape)  # elements in the keys, and in the values
        at = _HEADER.size + length  # where the keys start; the values follow them
        if len(buffer) != at + 2 * count * dtype.itemsize:
            raise ValueError(f"{len(buffer)} bytes, not the header's size")
        k = torch.frombuffer(buffer, dtype=dtype, count=count, offset=at)
        v = torch.frombuffer(buffer, dtype=dtype, count=count, offset=at + k.nbytes)
        return KVBlocks([bytes.fromhex(n) for n in header["names"]], k.view(shape), v.view(shape))
    except (ValueError, KeyError, RuntimeError, TypeError, struct.error, AttributeError) as exc:
        raise TransferError(f"bad KV message: {exc}") from exc
