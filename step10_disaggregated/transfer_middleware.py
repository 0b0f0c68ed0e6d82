"""kv_transfer_params through the OpenAI routes, which know nothing of them (common/ has no such
field, and a later step adds none there): read from the body on the way in, put into the
answer on the way out.

On the way in the body is read whole (after step 6's body limit, which sits outside), its
`kv_transfer_params` set as the request's KVTransfer for the engine's `submit`, and the body
handed on unchanged. On the way out, a prefill's whole (non-streamed) JSON answer gains the
`kv_transfer_params` the engine recorded once it held the blocks, as vLLM's prefill answer
does. Anything else passes through untouched.
"""

from __future__ import annotations

import json

from step10_disaggregated.engine import KV_TRANSFER, KVTransfer

GENERATE = ("/v1/completions", "/v1/chat/completions")


class KVTransferMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATE:
            return await self.app(scope, receive, send)
        body, disconnected = await _read_body(receive)
        transfer = _transfer(body)
        if transfer is None or disconnected:
            return await self.app(scope, _replay(body, receive, disconnected), send)
        token = KV_TRANSFER.set(transfer)
        try:
            if transfer.params.get("do_remote_decode"):
                send = _AnswerWithParams(send, transfer)
            await self.app(scope, _replay(body, receive, False), send)
        finally:
            KV_TRANSFER.reset(token)


async def _read_body(receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def _replay(body: bytes, receive, disconnected: bool):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            if disconnected:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then what the client does next (a disconnect)

    return replay


def _transfer(body: bytes) -> KVTransfer | None:
    try:
        params = json.loads(body).get("kv_transfer_params")
    except (ValueError, AttributeError):
        return None  # the route answers the bad body as it would without us
    return KVTransfer(params) if isinstance(params, dict) else None


class _AnswerWithParams:
    """Holds back a whole JSON answer with status 200, and adds the transfer's params to it."""

    def __init__(self, send, transfer: KVTransfer) -> None:
        self.send, self.transfer = send, transfer
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            if message["status"] == 200 and headers.get(b"content-type") == b"application/json":
                self.start = message
                return
        if self.start is None or message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            await self._send_whole()

    async def _send_whole(self) -> None:
        assert self.start is not None
        answer = json.loads(b"".join(self.chunks))
        answer["kv_transfer_params"] = self.transfer.answer
        body = json.dumps(answer).encode()
        headers = [(k, v) for k, v in self.start["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
