"""The API contract, parametrized over every step folder that exists.

Each step runs as a real server process with the real model, driven by the official `openai`
client. Same requests, same response schema, and the same greedy tokens as plain transformers
`generate` in fp32.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel, Field

from common.model import load_tokenizer
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
        **{"temperature": 0, "max_tokens": MAX_TOKENS, **kwargs},
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
        ask(client, "hi", n=9)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    response = httpx.post(server.url + "/v1/chat/completions", content=b"{oops")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/missing").status_code == 404
    assert "Paris" in ask(client, PROMPTS[0]).choices[0].message.content  # still serving


# ---------------------------------------------------------------- the API as clients use it

CAPITAL_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class Capital(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


def test_a_json_schema_answer_parses_and_validates(client):
    response = ask(
        client,
        "Give the capital of France, its country and its population as JSON.",
        max_tokens=80,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "capital", "schema": CAPITAL_SCHEMA, "strict": True},
        },
    )
    assert response.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(response.choices[0].message.content), CAPITAL_SCHEMA)


def test_the_openai_clients_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format=Capital,
        temperature=0,
        max_tokens=60,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.city


def test_a_named_tool_call_has_arguments_its_schema_accepts(client):
    response = ask(
        client,
        "What is the weather in Paris?",
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed = ask(
        client,
        "What is the weather in Paris?",
        max_tokens=60,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
    )
    chunks = [c for c in streamed if c.choices]
    calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id
    assert "".join(d.function.arguments or "" for d in calls) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_n_seeded_choices_are_the_same_on_a_rerun(client):
    def three():
        return client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=7, n=3
        )

    first, again = three(), three()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) > 1  # each choice its own draw
    assert first.usage.completion_tokens == 3 * 8


def test_logprobs_of_greedy_tokens_are_the_models_log_softmax(client, real_model_dir):
    from transformers import AutoModelForCausalLM

    prompt = "The capital of France is"
    response = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3
    )
    got = response.choices[0].logprobs
    tokenizer = load_tokenizer(real_model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)  # fmt: skip
    expected = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    new_ids = out.sequences[0, len(prompt_ids) :].tolist()
    assert got.tokens == [tokenizer.decode([t]) for t in new_ids]
    for logprob, top, token, row in zip(
        got.token_logprobs, got.top_logprobs, new_ids, expected, strict=True
    ):
        assert abs(logprob - float(row[token])) < 1e-4
        assert len(top) == 3 and max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
    chat = ask(client, PROMPTS[0], max_tokens=4, logprobs=True, top_logprobs=2)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 4 and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == chat.choices[0].message.content


def test_a_logit_bias_of_100_makes_its_token_the_answer(client, real_model_dir):
    tokenizer = load_tokenizer(real_model_dir)
    (banana,) = tokenizer.encode(" banana", add_special_tokens=False)
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
        logit_bias={str(banana): 100},
    )  # fmt: skip
    assert response.choices[0].text == " banana" * 3


def test_tokenize_and_detokenize(server, real_model_dir):
    tokenizer = load_tokenizer(real_model_dir)
    body = {"model": MODEL, "prompt": "Hello there"}
    tokenized = httpx.post(server.url + "/tokenize", json=body, timeout=30).json()
    assert tokenized["tokens"] == tokenizer.encode("Hello there")
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] > 0
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    templated = httpx.post(server.url + "/tokenize", json=chat, timeout=30).json()
    assert templated["tokens"] == tokenizer.apply_chat_template(
        chat["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    back = httpx.post(server.url + "/detokenize", json={"tokens": tokenized["tokens"]}, timeout=30)
    assert back.json() == {"prompt": "Hello there"}
