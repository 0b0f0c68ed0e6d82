"""The KV connector between processes: the decode engine pulls the blocks over HTTP from the
prefill engine's own server (POST /v1/kv/fetch, then /v1/kv/release), on a TCP socket.

Why a socket and not shared memory: the two pools are separate processes that Kubernetes may
place on separate machines (deploy/), and a socket reaches them there as on one machine, through
the HTTP server each engine already runs. What it costs is a copy of every block through the
kernel on each side (measured per prompt token in the README); shared memory would save those
copies on one machine, and RDMA (vLLM's NixlConnector) saves them between machines.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse

from common.errors import APIError
from step10_disaggregated.kv_connector import (
    KVBlocks,
    TransferError,
    TransferParams,
    decode,
    encode,
)

SLICE = 1 << 20  # bytes of the message sent at a time


class HttpConnector:
    """KVConnector to the server named by `remote_host` and `remote_port` in the params. Each
    call is one POST on a fresh connection, sent from a worker thread (http.client blocks)."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s  # to connect, and for each read from the socket

    def _request(self, params: TransferParams, what: str, body: dict) -> tuple[str, dict]:
        try:
            url = f"http://{params['remote_host']}:{int(params['remote_port'])}/v1/kv/{what}"
            rid = params["remote_request_id"]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"kv_transfer_params lack {exc}") from exc
        return url, {"remote_request_id": rid, **body}

    async def fetch(self, params: TransferParams, skip: int) -> KVBlocks:
        url, body = self._request(params, "fetch", {"skip": skip})
        message = await asyncio.to_thread(_fetch_whole, url, body, self.timeout_s)
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
    try:
        with leases.lend(str(body["remote_request_id"]), int(body.get("skip", 0))) as lent:
            blocks = await asyncio.to_thread(leases.gather, *lent)  # ~60 MB: off the loop
    except TransferError as exc:
        raise APIError(str(exc), 404, code="kv_not_found") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise APIError(f"bad KV fetch: {exc}", param="remote_request_id") from None
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
