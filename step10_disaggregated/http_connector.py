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

import httpx
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from common.api import off_loop
from common.errors import APIError
from step10_disaggregated.kv_connector import (
    KVBlocks,
    TransferError,
    TransferParams,
    decode,
    encode,
)


class HttpConnector:
    """KVConnector to the server named by `remote_host` and `remote_port` in the params."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.client = httpx.AsyncClient(timeout=timeout_s)

    def _post(self, params: TransferParams, what: str, body: dict):
        try:
            url = f"http://{params['remote_host']}:{int(params['remote_port'])}/v1/kv/{what}"
            rid = params["remote_request_id"]
        except (KeyError, TypeError, ValueError) as exc:
            raise TransferError(f"kv_transfer_params lack {exc}") from exc
        return self.client.post(url, json={"remote_request_id": rid, **body})

    async def fetch(self, params: TransferParams, skip: int) -> KVBlocks:
        response = await self._post(params, "fetch", {"skip": skip})
        if response.status_code != 200:
            raise TransferError(f"{response.status_code} {response.text[:200]}")
        return await asyncio.to_thread(decode, response.content)

    async def release(self, params: TransferParams, how: str) -> None:
        await self._post(params, "release", {"how": how})

    async def aclose(self) -> None:
        await self.client.aclose()


# ---------------------------------------------------------------- the prefill engine's side


async def fetch_route(http: HTTPRequest) -> Response:
    """The leased blocks of `remote_request_id` after the first `skip`, in encode's format."""
    engine = http.app.state.serving.engine
    body = await _json(http)
    try:
        blocks = engine.leases.read(str(body["remote_request_id"]), int(body.get("skip", 0)))
    except TransferError as exc:
        raise APIError(str(exc), 404, code="kv_not_found") from None
    except (KeyError, ValueError, TypeError) as exc:
        raise APIError(f"bad KV fetch: {exc}", param="remote_request_id") from None
    return Response(await off_loop(encode, blocks), media_type="application/octet-stream")


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
