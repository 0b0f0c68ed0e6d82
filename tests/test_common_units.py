"""Unit tests for common/: config, sampling, detokenization, stop sequences, the request."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import stat

import pytest
import torch

from common.config import ServerConfig
from common.detokenize import IncrementalDetokenizer, StopMatcher
from common.request import DeltaChannel, Request
from common.sampling import Sampler, SamplingParams
from tests.conftest import STEPS

MULTIBYTE = "Café naïve — 日本語のテキスト 🎉🚀 Ωμέγα"


# ---------------------------------------------------------------- config


def test_config_env_then_flags(monkeypatch):
    monkeypatch.setenv("GATEWAY_PORT", "9001")
    monkeypatch.setenv("GATEWAY_DTYPE", "bfloat16")
    config = ServerConfig.load(["--port", "9002"])
    assert config.port == 9002 and config.dtype == "bfloat16" and config.host == "127.0.0.1"


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="dtype"):
        ServerConfig(dtype="int3")
    with pytest.raises(ValueError, match="device"):
        ServerConfig(device="tpu")


def test_boolean_knobs_take_known_words_only(monkeypatch):
    from step4_mock_kv.server import Config

    assert Config.load(["--response-cache", "off"]).response_cache is False
    assert Config.load(["--response-cache", "Yes"]).response_cache is True
    # The cache's backend is Redis, so "redis" is a natural guess: it must not mean false.
    with pytest.raises(ValueError, match=r"--response-cache: 'redis' is not a boolean"):
        Config.load(["--response-cache", "redis"])
    monkeypatch.setenv("GATEWAY_RESPONSE_CACHE", "enabled")
    with pytest.raises(ValueError, match="GATEWAY_RESPONSE_CACHE: 'enabled'"):
        Config.load([])


def test_a_bad_flag_stops_the_start_with_one_line(monkeypatch):
    from common import app

    monkeypatch.setattr("sys.argv", ["step", "--port", "eighty"])
    with pytest.raises(SystemExit, match=r"error: --port: 'eighty' is not a valid int"):
        app.serve(lambda config: pytest.fail("the app was built from a bad config"))


@pytest.mark.parametrize("step", STEPS)
def test_every_knob_of_every_step_has_help_text(step, capsys):
    config_class = getattr(importlib.import_module(f"{step}.server"), "Config", ServerConfig)
    fields = dataclasses.fields(config_class)
    assert all(f.metadata.get("help") for f in fields), [f.name for f in fields]
    with pytest.raises(SystemExit):
        config_class.load(["--help"], prog=f"python -m {step}")
    shown = capsys.readouterr().out
    for f in fields:
        assert f"--{f.name.replace('_', '-')}" in shown
        assert f.metadata["help"].split()[0] in shown
    assert f"python -m {step}" in shown


def test_step7_config_has_only_the_knobs_step7_uses():
    from step7_real_kv.server import Config

    names = {f.name for f in dataclasses.fields(Config)}
    assert not names & {"max_queue_size", "max_batch_size", "max_wait_ms", "prefix_cache_mb"}
    assert {"num_kv_blocks", "max_waiting_requests", "redis_url", "log_format"} <= names


# ---------------------------------------------------------------- sampling


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 20) -> list[int]:
    sampler = Sampler(params)
    return [sampler.sample(logits) for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert draws(SamplingParams(temperature=0.0), logits, 5) == [1] * 5


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.zeros(1000)  # flat: every draw is a coin flip over 1000 tokens
    a = draws(SamplingParams(temperature=1.0, seed=7), logits)
    b = draws(SamplingParams(temperature=1.0, seed=7), logits)
    c = draws(SamplingParams(temperature=1.0, seed=8), logits)
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    best = int(torch.argmax(logits))
    assert set(draws(SamplingParams(temperature=1.5, top_k=1, seed=1), logits)) == {best}
    assert set(draws(SamplingParams(temperature=1.5, top_p=1e-6, seed=1), logits)) == {best}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-320),  # dividing by it gives inf, then NaN
        SamplingParams(temperature=1.0, top_p=5e-324, seed=1),  # 0.0 in float32
        SamplingParams(temperature=1.0, top_p=float.fromhex("0x1p-149"), seed=1),
    ],
    ids=["denormal-temperature", "denormal-top-p", "float32-denormal-top-p"],
)
def test_underflowing_parameters_still_give_the_most_likely_token(params):
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    assert set(draws(params, logits)) == {int(torch.argmax(logits))}


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63, 2**64 - 1])
def test_every_accepted_seed_seeds_a_generator(seed):
    logits = torch.zeros(1000)
    assert draws(SamplingParams(temperature=1.0, seed=seed), logits) == draws(
        SamplingParams(temperature=1.0, seed=seed), logits
    )


def test_presence_and_frequency_penalties_push_down_generated_tokens():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    plain = Sampler(SamplingParams(temperature=0.0))
    assert plain.sample(logits, [0, 0]) == 0  # no penalty: the repeat wins
    presence = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.2))
    assert presence.sample(logits, [0]) == 1  # 2.0 - 0.2 < 1.9
    frequency = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.06))
    assert frequency.sample(logits, [0]) == 0  # 2.0 - 0.06 > 1.9
    assert frequency.sample(logits, [0, 0]) == 1  # 2.0 - 0.12 < 1.9
    rewarded = Sampler(SamplingParams(temperature=0.0, presence_penalty=-2.0))
    assert rewarded.sample(logits, [1]) == 1  # a negative penalty favours what was said


def test_top_k_limits_the_support():
    logits = torch.arange(100, dtype=torch.float32) / 10
    picked = set(draws(SamplingParams(temperature=2.0, top_k=3, seed=3), logits, 200))
    assert picked <= {97, 98, 99} and len(picked) > 1


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    picked = set(draws(SamplingParams(temperature=1.0, top_p=0.75, seed=5), probs.log(), 300))
    assert picked == {0, 1}


# ---------------------------------------------------------------- detokenization


def stream_text(tokenizer, text: str) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    return [*pieces, detok.flush()]


def test_incremental_detokenizer_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    # The point of the test: some tokens really do end mid-character.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    pieces = stream_text(tokenizer, MULTIBYTE)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE


def test_incremental_detokenizer_keeps_spaces(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    assert "".join(stream_text(tokenizer, text)) == text


@pytest.mark.parametrize(
    "chunks, stops, expected, stopped",
    [
        (["Hello wor", "ld!"], ["world"], "Hello ", True),  # split across pushes
        (["abc", "de"], ["xyz"], "abcde", False),  # no match: everything comes out
        (["The EN", "D is near"], ["END"], "The ", True),
        (["a", "b", "c"], ["bd", "c"], "ab", True),  # the earliest stop wins
    ],
)
def test_stop_matcher(chunks, stops, expected, stopped):
    matcher, out, hit = StopMatcher(stops), "", False
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (expected, stopped)


def test_stop_matcher_holds_back_a_possible_prefix():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("go ST") == ("go ", False)  # "ST" might become STOP
    assert matcher.push("ay") == ("STay", False)  # it did not


# ---------------------------------------------------------------- the request


def run_tokens(tokenizer, token_ids, **kwargs):
    async def go():
        params = SamplingParams(temperature=0.0, stop=kwargs.pop("stop", []))
        max_tokens = kwargs.pop("max_tokens", 100)
        request = Request([1, 2], params, max_tokens, tokenizer, {2}, channel=DeltaChannel())
        for t in token_ids:
            if request.append_token(t):
                break
        deltas = []
        async for d in request.deltas():
            deltas.append(d)
        return request, deltas

    async def with_timeout():
        return await asyncio.wait_for(go(), 5)

    return asyncio.run(with_timeout())


def test_request_stop_sequence_split_across_tokens_is_never_emitted(tokenizer):
    text = "Sure. The answer is 42 and that is final."
    ids = tokenizer.encode(text, add_special_tokens=False)
    request, deltas = run_tokens(tokenizer, ids, stop=["is final"])
    emitted = "".join(d.text for d in deltas)
    assert emitted == "Sure. The answer is 42 and that "
    assert deltas[-1].finish_reason == "stop" and request.finish_reason == "stop"


def test_request_max_tokens_finishes_with_length(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    request, deltas = run_tokens(tokenizer, ids, max_tokens=3)
    assert request.num_output_tokens == 3
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids[:3])


def test_request_eos_finishes_with_stop_and_emits_no_special_text(tokenizer):
    ids = [*tokenizer.encode("Paris.", add_special_tokens=False), 2, 100, 101]
    request, deltas = run_tokens(tokenizer, ids)
    assert "".join(d.text for d in deltas) == "Paris."
    assert request.finish_reason == "stop"
    assert request.num_output_tokens == len(ids) - 2  # EOS counts; nothing after it


def test_request_streams_multibyte_text_whole(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    request, deltas = run_tokens(tokenizer, ids, max_tokens=len(ids))
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == MULTIBYTE


def test_a_request_needs_no_event_loop(tokenizer):
    """The domain knows no transport: built, advanced and finished in plain synchronous code."""
    stored = []
    ids = tokenizer.encode(" Paris is lovely", add_special_tokens=False)
    request = Request([1, 2], SamplingParams(temperature=0.0), len(ids), tokenizer, {2})
    request.add_done_callback(stored.append)
    finished = [request.append_token(t) for t in ids]
    assert finished == [False] * (len(ids) - 1) + [True]
    assert request.text == " Paris is lovely" and request.finish_reason == "length"
    assert request.output_ids == ids and request.prompt_ids == [1, 2]
    assert request.token_ids == [1, 2, *ids]  # one list, one owner
    assert stored == [request]  # with no channel, callbacks run at once


def test_a_saved_model_folder_is_readable_by_all(tiny_model_dir):
    """Written by common.model.save_folder, as `fetch` writes the converted model: the weights,
    which safetensors creates owner-only, are readable by every user, like the tokenizer."""
    modes = {p.name: p.stat().st_mode for p in tiny_model_dir.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    unreadable = [name for name, mode in modes.items() if mode & stat.S_IROTH == 0]
    assert unreadable == []
