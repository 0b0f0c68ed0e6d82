"""The error boundary and keep-alive, through a real uvicorn on a real socket.

An app built by common.app.create_app with one extra route that fails: the failure must come
back as an OpenAI-shaped 500 with `Connection: close`, be logged with the request id, and leave
the server and the client's next request fine. After a 4xx the same connection stays usable.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from common.app import create_app
from step5_observability.structured_logs import RequestIdMiddleware
from tests.conftest import free_port


async def boom(http) -> JSONResponse:
    raise RuntimeError("a bug in a route")


async def fine(http) -> JSONResponse:
    return JSONResponse({"status": "fine"})


@pytest.fixture(scope="module")
def url():
    @asynccontextmanager
    async def lifespan(app):
        yield  # no model: the generation routes answer 503 not_ready

    routes = [Route("/boom", boom), Route("/fine", fine)]
    app = create_app(lifespan, routes, [Middleware(RequestIdMiddleware)])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_an_exception_in_a_route_is_a_500_with_connection_close(url, caplog):
    with caplog.at_level("ERROR", logger="gateway"), httpx.Client(base_url=url) as client:
        response = client.get("/boom", headers={"X-Request-Id": "rid-42"})
        after = client.get("/fine")  # the same client, its pool: a fresh connection
    assert response.status_code == 500
    assert response.headers["connection"] == "close"
    assert response.json() == {
        "error": {
            "message": "internal server error",
            "type": "internal_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "Traceback" not in response.text and "a bug" not in response.text
    assert after.status_code == 200
    logged = [r for r in caplog.records if "internal error on /boom" in r.getMessage()]
    assert logged and "rid-42" in logged[0].getMessage() and logged[0].exc_info


def test_after_an_error_response_the_same_connection_serves_the_next_request(url):
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.connect()
    sock = connection.sock
    for path, status in [("/v1/nothing", 404), ("/v1/models", 503), ("/fine", 200)]:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        assert response.status == status
        assert response.getheader("connection") != "close"
    assert connection.sock is sock  # one connection, kept alive throughout
    connection.request("GET", "/boom")
    response = connection.getresponse()
    response.read()
    assert response.status == 500 and response.getheader("connection") == "close"
    connection.close()


def test_a_server_error_after_a_keep_alive_request_does_not_reset_the_next_client(url):
    """The client that got a 500 reconnects cleanly: no reset, no half-read response."""
    with httpx.Client(base_url=url) as client:
        for _ in range(3):
            assert client.get("/boom").status_code == 500
            assert client.get("/fine").json() == {"status": "fine"}
    with socket.create_connection((url.split(":")[1][2:], int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")
