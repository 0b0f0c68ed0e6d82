"""The API contract, parametrized over every step folder that exists.

Each step runs as a real server process with the real model, driven by the official `openai`
client. Same requests, same response schema, and the same greedy tokens as plain transformers
`generate` in fp32.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.conftest import STEPS, ServerProcess

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Write one sentence about the sea.",
]
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def reference(real_model_dir) -> dict[str, str]:
    """Greedy answers from plain transformers `generate`, fp32: the ground truth for every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(real_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32)
    answers = {}
    for prompt in PROMPTS:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers[prompt] = tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    return answers


@pytest.fixture(scope="module", params=STEPS)
def server(request, tmp_path_factory, real_model_dir):
    proc = ServerProcess(request.param, tmp_path_factory.mktemp(request.param) / "server.log")
    yield proc
    proc.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, prompt: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        **kwargs,
    )


def test_chat_greedy_matches_transformers_generate(client, reference):
    for prompt in PROMPTS:
        response = ask(client, prompt)
        assert response.object == "chat.completion"
        choice = response.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == reference[prompt]
        assert choice.finish_reason in ("stop", "length")
        assert response.usage.total_tokens == (
            response.usage.prompt_tokens + response.usage.completion_tokens
        )


def test_capital_of_france_names_paris_streaming_and_not(client, reference):
    prompt = PROMPTS[0]
    assert "Paris" in ask(client, prompt).choices[0].message.content
    stream = ask(client, prompt, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference[prompt]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length") and set(finishes[:-1]) == {None}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions_streaming_and_not_agree(client):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    parts = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in parts if c.choices) == whole.choices[0].text


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, "hi", n=2)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{oops")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/missing").status_code == 404
    assert "Paris" in ask(client, PROMPTS[0]).choices[0].message.content  # still serving
