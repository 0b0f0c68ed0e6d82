"""A client that disconnects mid-stream stops its own generation, on every step.

The tiny model can generate for thousands of tokens without hitting EOS, so a request for
1000 tokens is still running when the client hangs up after a few chunks. The worker's log line
for that request must say it was cancelled well before max_tokens.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.conftest import STEPS

pytestmark = pytest.mark.integration

MAX_TOKENS = 1000  # under step 6's default max_tokens_limit (1024)


def done_line(server, request_id: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if f"request {request_id} done" in line:
                return line
        time.sleep(0.2)
    raise AssertionError(f"no done line for {request_id}:\n{server.log()}")


@pytest.mark.parametrize("step", STEPS)
def test_disconnect_mid_stream_stops_generation(step, start_server, tiny_model_dir):
    server = start_server(step, GATEWAY_MODEL=str(tiny_model_dir))
    body = {
        "model": "SmolLM2-135M-Instruct",
        "prompt": "Once upon a time",
        "stream": True,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", server.url + "/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line)[len("data: ") :])
        for _ in range(3):
            next(lines)
    line = done_line(server, first["id"])
    assert "status=cancelled" in line, line
    produced = int(re.search(r"output_tokens=(\d+)", line).group(1))
    assert produced < MAX_TOKENS
    # The server is still healthy and serving.
    assert httpx.get(server.url + "/health").status_code == 200
