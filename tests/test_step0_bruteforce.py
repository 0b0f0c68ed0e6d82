"""Step 0: the weights are loaded inside every request and dropped after it."""

from __future__ import annotations

import gc
import weakref

import step0_bruteforce.bruteforce as bruteforce
from tests.conftest import tiny_client

BODY = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 3, "temperature": 0}


def test_every_request_loads_its_own_model_and_drops_it(tiny_model_dir, monkeypatch):
    loaded = []
    real_load = bruteforce.load_model

    def counting_load(*args, **kwargs):
        lm = real_load(*args, **kwargs)
        loaded.append(weakref.ref(lm.model))
        return lm

    monkeypatch.setattr(bruteforce, "load_model", counting_load)
    with tiny_client("step0_bruteforce", tiny_model_dir) as client:
        assert not loaded  # nothing at startup: only the tokenizer
        texts = [
            client.post("/v1/completions", json=BODY).json()["choices"][0]["text"] for _ in range(3)
        ]
    gc.collect()
    assert len(loaded) == 3
    assert all(ref() is None for ref in loaded)  # no copy of the weights outlives its request
    assert len(set(texts)) == 1  # the same weights from disk, the same greedy answer
