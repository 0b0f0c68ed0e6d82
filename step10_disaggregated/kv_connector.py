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
import struct
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

_HEADER = struct.Struct("<I")  # the length of the JSON header that follows, in bytes


def encode(blocks: KVBlocks) -> bytes:
    """One message: header length, JSON header (names, shape, dtype), keys, values."""
    header = json.dumps(
        {
            "names": [n.hex() for n in blocks.names],
            "shape": list(blocks.k.shape),
            "dtype": str(blocks.k.dtype).removeprefix("torch."),
        }
    ).encode()
    k, v = (t.contiguous().view(torch.uint8).numpy().tobytes() for t in (blocks.k, blocks.v))
    return _HEADER.pack(len(header)) + header + k + v


def decode(message: bytes) -> KVBlocks:
    """`encode`'s inverse; a message of the wrong length raises TransferError."""
    try:
        (length,) = _HEADER.unpack_from(message)
        header = json.loads(message[_HEADER.size : _HEADER.size + length])
        dtype = getattr(torch, header["dtype"])
        shape = header["shape"]
        body = memoryview(message)[_HEADER.size + length :]
        half = len(body) // 2
        parts = (body[:half], body[half:])
        k, v = (torch.frombuffer(bytearray(part), dtype=dtype) for part in parts)
        return KVBlocks([bytes.fromhex(n) for n in header["names"]], k.view(shape), v.view(shape))
    except (ValueError, KeyError, RuntimeError, struct.error, AttributeError) as exc:
        raise TransferError(f"bad KV message: {exc}") from exc
