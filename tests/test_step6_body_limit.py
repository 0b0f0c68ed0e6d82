"""Step 6's body limit at the door: a declared Content-Length over the limit is answered with a
413 at once and the connection closed, whatever the client does with its body (sends none,
sends part and waits, sends it all); a chunked body is cut off as it passes the limit."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
URL = "/v1/completions"
LIMIT = 1 << 20  # the default max_body_bytes
PROMPT_ANSWER_S = 2.0  # generous: with the body read first it took 4-10 s, or never came

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    from tests.conftest import ServerProcess

    env = {"GATEWAY_MODEL": str(tiny_model_dir), "GATEWAY_RESPONSE_CACHE": "false"}
    log = tmp_path_factory.mktemp("body-limit") / "server.log"
    proc = ServerProcess("step6_backpressure", log, env)
    yield proc
    proc.stop()


def body(**fields) -> dict:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": 4, **fields}


def raw_post(url: str, declared: int, send: int) -> tuple[float, bytes]:
    """POST with `Content-Length: declared`, then `send` bytes of the body from a thread of
    its own while this one reads: seconds to the answer's first byte, and all of it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        head = f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        start = time.monotonic()
        s.sendall(f"{head}Content-Length: {declared}\r\n\r\n".encode())
        threading.Thread(target=_send_quietly, args=(s, b"x" * send), daemon=True).start()
        first = s.recv(65536)
        elapsed = time.monotonic() - start
        return elapsed, first + _read_to_close(s)


def _send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server has answered and closed: not wanted
        s.sendall(data)


def _read_to_close(s: socket.socket) -> bytes:
    """What is left of the answer; the server closes the connection after it. A reset is an
    end too (the client's unsent body bytes meet a closed socket), once the answer is read."""
    chunks = []
    try:
        while chunk := s.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def assert_413(answer: bytes) -> None:
    head, _, payload = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413"), answer[:300]
    assert "connection: close" in head.lower(), head
    error = json.loads(payload)["error"]
    assert error["code"] == "body_too_large" and error["type"] == "invalid_request_error", error
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("declared", "send"),
    [
        (LIMIT + 1, 0),  # one byte over, and no body at all
        (1_250_000, 0),  # headers only: the client waits for an answer before it sends
        (1_250_000, 600_000),  # part of the body, then it waits
        (5 << 20, 5 << 20),  # 5 MB sent in full while the answer comes
        (50 << 20, 0),  # far over
    ],
)
def test_a_declared_length_over_the_limit_is_answered_at_once(server, declared, send):
    elapsed, answer = raw_post(server.url, declared, send)
    assert elapsed < PROMPT_ANSWER_S, (elapsed, answer[:200])
    assert_413(answer)


def test_the_limit_itself_is_not_refused(server):
    """Exactly max_body_bytes declared and sent: read and answered (a 400 for the JSON)."""
    response = httpx.post(server.url + URL, content=b" " * LIMIT, timeout=30)
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("chunked", [False, True])
def test_an_http_client_sending_five_megabytes_reads_the_413(server, chunked):
    """httpx writes its whole body before it reads: it meets a closed connection and still
    finds the answer (with Content-Length, from the headers; chunked, once past the limit)."""
    payload = json.dumps(body(prompt="x" * (5 << 20))).encode()
    parts = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]
    start = time.monotonic()
    response = httpx.post(
        server.url + URL,
        content=iter(parts) if chunked else payload,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert time.monotonic() - start < PROMPT_ANSWER_S
    assert response.status_code == 413 and response.headers["connection"] == "close"
    assert response.json()["error"]["code"] == "body_too_large"


def test_others_are_served_while_refused_clients_hold_their_connections(server):
    """Twenty refused clients that keep their sockets open cost the others nothing."""
    host, port = server.url.removeprefix("http://").split(":")
    head = f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Length: {LIMIT * 2}\r\n\r\n".encode()
    holders = [socket.create_connection((host, int(port)), timeout=10) for _ in range(20)]
    try:
        for s in holders:
            s.sendall(head)
        response = httpx.post(server.url + URL, json=body(), timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"]
        for s in holders:
            assert_413(s.recv(65536) + _read_to_close(s))
    finally:
        for s in holders:
            s.close()
