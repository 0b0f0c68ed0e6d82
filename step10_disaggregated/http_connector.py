"""The KV connector between processes: the decode engine asks the prefill engine's own server
for the blocks (POST /v1/kv/fetch, then /v1/kv/release), and they come one of two ways:

- `via="http"`: in the answer's body, over the TCP socket. It reaches a prefill engine
  anywhere, as Kubernetes may place the two pools on separate machines (deploy/). What it costs
  is a copy of every block through the kernel on each side, and the sender's event loop
  writing the slices, on the same cores that decode.
- `via="shm"`: the prefill engine writes the blocks into a file in /dev/shm (memory shared by
  the processes of one machine) and answers with its path; the decode engine maps the file and
  copies from it into its pool. One copy on each side and no socket: only for engines on one
  machine (step 10's local pair). Where that fails (no room in /dev/shm, a prefill engine on
  another machine, whose file is not here) the decode engine asks again over the socket.

RDMA (vLLM's NixlConnector) is the third way, between machines without the kernel's copies.
The cost per prompt token of each way is measured in the README (`python -m bench.transfer`).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import mmap
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from common.errors import APIError
from step7_real_kv.speed import torch_thread
from step10_disaggregated.kv_connector import (
    KVBlocks,
    TransferError,
    TransferParams,
    decode,
    encode,
    remove_file,
)

SLICE = 1 << 20  # bytes of the message sent at a time


log = logging.getLogger("gateway")

VIAS = ("http", "shm")
SHM_DIR = "/dev/shm"


class HttpConnector:
    """KVConnector to the server named by `remote_host` and `remote_port` in the params. Each
    call is one POST on a fresh connection, sent from a worker thread (http.client blocks)."""

    def __init__(self, timeout_s: float = 30.0, via: str = "http") -> None:
        if via not in VIAS:
            raise ValueError(f"via is one of {VIAS}")
        self.timeout_s = timeout_s  # to connect, and for each read from the socket
        self.via = via

    def _request(self, params: TransferParams, what: str, body: dict) -> tuple[str, dict]:
        try:
            url = f"http://{params['remote_host']}:{int(params['remote_port'])}/v1/kv/{what}"
            rid = params["remote_request_id"]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"kv_transfer_params lack {exc}") from exc
        return url, {"remote_request_id": rid, **body}

    async def fetch(self, params: TransferParams, skip: int) -> KVBlocks:
        url, body = self._request(params, "fetch", {"skip": skip, "via": self.via})
        if self.via == "shm":
            try:
                return await torch_thread.apart(_fetch_mapped, url, body, self.timeout_s)
            except TransferError as exc:  # no room in /dev/shm there, no such file here, ...
                log.warning("KV blocks not had through /dev/shm (%s): over the socket", exc)
                body = {**body, "via": "http"}
        message = await torch_thread.apart(_fetch_whole, url, body, self.timeout_s)
        return decode(message)  # the keys and values stay where they were received

    async def release(self, params: TransferParams, how: str) -> None:
        url, body = self._request(params, "release", {"how": how})
        await asyncio.to_thread(_release, url, body, self.timeout_s)


@contextmanager
def _posted(url: str, body: dict, timeout_s: float) -> Iterator[http.client.HTTPResponse]:
    """POST `body` as JSON to `url` on a fresh connection; its response, open until the block
    ends. A refused connection or a timeout raises OSError, a malformed answer
    http.client.HTTPException."""
    where = urlsplit(url)
    host = where.hostname or "127.0.0.1"
    connection = http.client.HTTPConnection(host, where.port, timeout=timeout_s)
    try:
        headers = {"Content-Type": "application/json"}
        connection.request("POST", where.path, json.dumps(body).encode(), headers)
        yield connection.getresponse()
    finally:
        connection.close()


def _fetch_whole(url: str, body: dict, timeout_s: float) -> bytearray:
    """POST /v1/kv/fetch and read the answer into one buffer of the announced length, on a
    worker thread: http.client fills the buffer with the socket's recv_into, in C, with the GIL
    released. httpx's reader, pure Python and 64 KB at a time, spent about 100 ms of CPU on a
    60 MB prompt, taken from the decode engine's own core (and so from its streams' tokens)."""
    with _posted(url, body, timeout_s) as response:
        if response.status != 200:
            raise TransferError(f"{response.status} {response.read(200).decode(errors='replace')}")
        try:
            message = bytearray(int(response.getheader("content-length", "")))
        except ValueError as exc:
            raise TransferError(f"a KV message without a length: {exc}") from exc
        view, at = memoryview(message), 0
        while at < len(message):
            got = response.readinto(view[at:])
            if not got:
                raise TransferError(f"a KV message cut short: {at} of {len(message)} bytes")
            at += got
        return message


def _fetch_mapped(url: str, body: dict, timeout_s: float) -> KVBlocks:
    """POST /v1/kv/fetch with via shm: the answer names a file of /dev/shm holding the message;
    map it (the keys and values are read from the shared pages where they lie) and unlink it,
    so it goes when the mapping does."""
    with _posted(url, body, timeout_s) as response:
        answer = response.read()
        if response.status != 200:
            raise TransferError(f"{response.status} {answer[:200].decode(errors='replace')}")
    try:
        path = json.loads(answer)["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TransferError(f"a shm answer without a path: {exc}") from exc
    if os.path.dirname(path) != SHM_DIR:
        raise TransferError(f"a shm path outside {SHM_DIR}: {path!r}")
    try:
        with open(path, "r+b") as file:
            mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    finally:
        remove_file(path)
    return decode(mapped)


def _release(url: str, body: dict, timeout_s: float) -> None:
    """POST /v1/kv/release. Neither the status nor the answer is checked: the lease ends either
    way, here or by expiring ({"released": false}: it had ended already)."""
    with _posted(url, body, timeout_s) as response:
        response.read()


# ---------------------------------------------------------------- the prefill engine's side


async def fetch_route(http: HTTPRequest) -> Response:
    """The leased blocks of `remote_request_id` after the first `skip`, in encode's format,
    streamed in slices as the socket takes them."""
    leases = http.app.state.serving.engine.leases
    body = await _json(http)
    via = body.get("via", "http")
    if via not in VIAS:
        raise APIError(f"via is one of {VIAS}", param="via")
    try:
        request_id = str(body["remote_request_id"])
        with leases.lend(request_id, int(body.get("skip", 0))) as (names, block_ids):
            # Off the loop, on a thread of their own: torch's copies there open OpenMP regions,
            # and a thread that stayed would keep a second team (step 7's speed/torch_thread.py)
            if via == "shm":  # ~60 MB into shared memory
                path = await torch_thread.apart(leases.gather_to_file, names, block_ids, SHM_DIR)
            else:
                blocks = await torch_thread.apart(leases.gather, names, block_ids)
    except TransferError as exc:
        raise APIError(str(exc), 404, code="kv_not_found") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise APIError(f"bad KV fetch: {exc}", param="remote_request_id") from None
    leases.stats.messages[via] += 1
    if via == "shm":
        leases.attach_file(request_id, path)  # if the reader never comes, the lease's end
        return JSONResponse({"path": path})
    parts = encode(blocks)
    size = str(sum(part.nbytes for part in parts))
    return StreamingResponse(
        _slices(parts), media_type="application/octet-stream", headers={"content-length": size}
    )


async def _slices(parts: list[memoryview]) -> AsyncIterator[memoryview]:
    """The parts in slices of SLICE bytes: the server copies each slice once on its way to the
    socket (h11 frames it) and waits for the socket to drain between slices, rather than
    buffering a whole copy of the message at once."""
    for part in parts:
        for at in range(0, part.nbytes, SLICE):
            yield part[at : at + SLICE]


async def release_route(http: HTTPRequest) -> Response:
    engine = http.app.state.serving.engine
    body = await _json(http)
    how = body.get("how") if body.get("how") in ("confirmed", "cancelled") else "confirmed"
    released = engine.leases.release(str(body.get("remote_request_id")), how)
    return JSONResponse({"released": released})


async def _json(http: HTTPRequest) -> dict:
    try:
        body = await http.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise APIError("the body must be a JSON object")
    return body
