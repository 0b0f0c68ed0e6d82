"""Step 8: speculative decoding, exact. Greedy tokens equal step 7's (and transformers') whether
drafts are all accepted, all rejected, or cut by a stop string, EOS or max_tokens; sampling
keeps the model's distribution; after rejections the pool and the prefix cache hold what a run
without speculation holds."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import httpx
import pytest
import torch

from common.config import ServerConfig
from common.model import load_model
from common.request import Request
from common.sampling import Sampler, SamplingParams
from step7_real_kv.engine import EngineConfig, PagedEngine
from step8_speculative.draft_policy import (
    Acceptance,
    RowCosts,
    measure_row_costs,
    plan_drafts,
    time_row_costs,
)
from step8_speculative.engine import SpeculativeConfig, SpeculativeEngine
from step8_speculative.proposer import PromptLookup, ProposerConfig
from step8_speculative.verify import verify
from tests.engine_helpers import drain, make_request
from tests.test_step6_backpressure import metric
from tests.test_step7_paged_engine import reference

REPEATING = [11, 12, 13, 14, 15, 16, 17, 18] * 4  # prompt lookup finds long drafts here
FREE = RowCosts({1: 1.0})  # a row costs nothing: every draft with any chance pays
DEAR = RowCosts({1: 1.0, 2: 2.0})  # a row costs a whole iteration: no draft pays
SOME = RowCosts({1: 1.0, 2: 1.3})  # each row 0.3 of an iteration of one sequence
STEP = RowCosts({1: 1.0, 8: 1.0, 9: 3.0, 16: 4.0})  # up to 8 rows alike, then dear


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(ServerConfig(model=str(tiny_model_dir)))


def run(engine, lm, prompts, max_tokens: int, **sampling) -> list[Request]:
    async def go():
        requests = [make_request(lm, p, max_tokens, **sampling) for p in prompts]
        for request in requests:
            await engine.submit(request)
        while engine.scheduler.has_work:
            await engine.step()
        for request in requests:
            await drain(request)
        return requests

    return asyncio.run(go())


def spec(lm, costs: RowCosts = FREE, **config) -> SpeculativeEngine:
    """Step 8's engine; its rows cost as `costs` says (FREE: it drafts wherever it can)."""
    settings = {"block_size": 4, "num_kv_blocks": 128, **config}
    engine = SpeculativeEngine(lm, SpeculativeConfig(**settings))
    engine.row_costs = costs
    return engine


def plain(lm, **config) -> PagedEngine:
    return PagedEngine(lm, EngineConfig(**{"block_size": 4, "num_kv_blocks": 128, **config}))


# ---------------------------------------------------------------- the proposer


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookup(ProposerConfig(num_speculative_tokens=3, ngram_max=3, ngram_min=1))
    assert lookup.propose([1, 2, 3, 4, 9, 1, 2, 3]) == [4, 9, 1]  # after "1 2 3"
    assert lookup.propose([5, 1, 2, 7, 1, 2, 8, 1, 2]) == [8, 1, 2]  # the latest "1 2"
    assert lookup.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert lookup.propose([1, 2, 3, 1, 2, 3], k=2) == [1, 2]
    assert lookup.propose([1, 2, 1, 2, 1, 2]) == [1, 2, 1]  # a run of repeats goes on
    assert lookup.propose([4, 7, 7, 7], k=4) == [7, 7, 7, 7]


# ---------------------------------------------------------------- greedy: exact


def test_greedy_tokens_equal_step7_and_transformers_with_long_drafts(tiny_lm):
    prompts = [REPEATING, REPEATING[3:] + [99, 100], [5, 6, 7]]
    engine = spec(tiny_lm)
    got = [r.output_ids for r in run(engine, tiny_lm, prompts, 24)]
    assert got == [r.output_ids for r in run(plain(tiny_lm), tiny_lm, prompts, 24)]
    assert got == [reference(tiny_lm, p, 24) for p in prompts]
    assert engine.stats.verifications > 0 and engine.stats.accepted > 0


def test_greedy_tokens_stay_exact_when_every_draft_is_wrong(tiny_lm):
    engine = spec(tiny_lm)
    engine.proposer.propose = lambda tokens, k=None: [7] * (k or 5)  # never what comes next
    prompts = [REPEATING, [5, 6, 7, 8]]
    got = [r.output_ids for r in run(engine, tiny_lm, prompts, 16)]
    assert got == [reference(tiny_lm, p, 16) for p in prompts]
    assert engine.stats.drafted > 0


def test_max_tokens_and_eos_inside_an_accepted_run_end_where_they_would(tiny_lm):
    alone = reference(tiny_lm, REPEATING, 40)
    for max_tokens in (1, 2, 3, 7):  # cut inside a run of k = 5 drafts
        (request,) = run(spec(tiny_lm), tiny_lm, [REPEATING], max_tokens)
        assert request.output_ids == alone[:max_tokens]
        assert request.finish_reason == "length"
    eos = alone[5]  # make the 6th token the end of the answer: it is inside a draft
    engine = spec(tiny_lm)

    async def go():
        request = make_request(tiny_lm, REPEATING, 40)
        request.eos_token_ids = {eos}
        await engine.submit(request)
        while engine.scheduler.has_work:
            await engine.step()
        return request

    request = asyncio.run(go())
    assert request.output_ids == alone[: alone.index(eos) + 1]
    assert request.finish_reason == "stop"


def test_a_stop_string_inside_an_accepted_run_cuts_the_text_where_step7_does(tiny_lm):
    alone = run(plain(tiny_lm), tiny_lm, [REPEATING], 30)[0]
    stop = alone.text[len(alone.text) // 2 : len(alone.text) // 2 + 3]
    assert stop.strip()
    with_spec = run(spec(tiny_lm), tiny_lm, [REPEATING], 30, stop=[stop])[0]
    without = run(plain(tiny_lm), tiny_lm, [REPEATING], 30, stop=[stop])[0]
    assert with_spec.text == without.text and stop not in with_spec.text
    assert with_spec.finish_reason == without.finish_reason == "stop"


@pytest.mark.parametrize(
    "config",
    [
        {"max_num_batched_tokens": 6, "max_num_seqs": 2},  # the budget cuts drafts
        {"num_kv_blocks": 14},  # too few blocks: preemptions, drafts kept out of them
    ],
)
def test_greedy_stays_exact_under_a_tight_budget_and_pool(tiny_lm, config):
    prompts = [REPEATING, REPEATING[2:], [5, 6, 7, 8, 9]]
    got = [r.output_ids for r in run(spec(tiny_lm, **config), tiny_lm, prompts, 12)]
    assert got == [reference(tiny_lm, p, 12) for p in prompts]


def test_n_greedy_choices_share_the_prompt_and_each_speculates(tiny_lm):
    """n = 3 greedy choices fork after the shared prefill; each then drafts on its own, and
    each equals transformers' answer; the prompt's full blocks are held once."""
    from tests.test_step7_edges import choices_of, run_counting

    config = SpeculativeConfig(block_size=4, num_kv_blocks=128)
    engine = SpeculativeEngine(tiny_lm, config)
    engine.row_costs = FREE
    three, _, blocks = run_counting(engine, lambda: choices_of(tiny_lm, REPEATING, 3, 20))
    expected = reference(tiny_lm, REPEATING, 20)
    assert [r.output_ids for r in three] == [expected] * 3
    assert engine.stats.verifications >= 3 and engine.stats.accepted > 0
    assert blocks <= len(REPEATING) // 4 + 3 * 7  # 8 shared blocks, then each choice's own
    assert engine.blocks.num_free == config.num_kv_blocks


def test_a_grammar_complete_inside_an_accepted_run_ends_the_answer_where_step7_does(tiny_lm):
    """The whole JSON drafted right at once: the grammar takes the verified run before the
    tokens are appended, and the answer must still end at the token that completes it."""
    from common.grammar import grammars_for, json_grammar
    from common.request import DeltaChannel

    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
              "required": ["city"], "additionalProperties": False}  # fmt: skip
    grammar = json_grammar(schema)

    def ask(engine) -> Request:
        async def go():
            constraint = grammars_for(tiny_lm.tokenizer).constraint(grammar, "response_format")
            request = Request([5, 6, 7], SamplingParams(temperature=0.0), 40, tiny_lm.tokenizer,
                              {tiny_lm.tokenizer.eos_token_id}, channel=DeltaChannel(),
                              constraint=constraint)  # fmt: skip
            await engine.submit(request)
            while engine.scheduler.has_work:
                await engine.step()
            await drain(request)
            return request

        return asyncio.run(go())

    alone = ask(plain(tiny_lm))
    engine = spec(tiny_lm)
    answer = alone.output_ids
    engine.proposer.propose = lambda tokens, k=None: answer[len(tokens) - 3 :][: k or 5] or [7]
    with_spec = ask(engine)
    assert json.loads(alone.text)["city"] in ("Paris", "Lyon")
    assert with_spec.text == alone.text and with_spec.output_ids == answer
    assert with_spec.finish_reason == alone.finish_reason == "stop"
    assert engine.stats.accepted >= 3  # the answer came in runs of drafts


# ---------------------------------------------------------------- where speculation stops


def verified_at_first_decode(lm, running: int, **config) -> SpeculativeEngine:
    """`running` 8-token prompts prefilled in one iteration, then one decode iteration with a
    proposer that always proposes: the engine, whose stats say how many sequences were verified
    in it (0: none drafted)."""
    engine = spec(lm, **config)
    engine.proposer.propose = lambda tokens, k=None: [7] * (k or 5)

    async def go():
        for i in range(running):
            await engine.submit(make_request(lm, [5 + i, 6, 7, 8, 9, 10, 11, 12], 8))
        await engine.step()  # every prompt in, a first token each: now all decode
        assert [s.num_pending for s in engine.scheduler.running] == [1] * running
        await engine.step()
        return engine

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("running", "costs", "verified"),
    [
        (1, FREE, 1), (3, FREE, 3),  # rows for nothing: everyone drafts
        (1, DEAR, 0), (3, DEAR, 0),  # a row as dear as an iteration: no one does
        (1, STEP, 1), (2, STEP, 2),  # 1 + 5 rows, 2 + 6 rows: within the cheap 8
        (8, STEP, 0),  # 8 decodes fill the cheap rows: a draft row would cost 2 iterations
    ],
)  # fmt: skip
def test_drafts_only_where_rows_are_cheap_at_this_batch_size(tiny_lm, running, costs, verified):
    """New sequences probe (their drafts taken as sure); whether they do depends only on
    what a row costs at this batch size."""
    engine = verified_at_first_decode(tiny_lm, running, costs=costs, max_num_seqs=8)
    assert engine.stats.verifications == verified
    assert engine.stats.skipped["cost"] == running - verified


def test_row_costs_are_the_runners_own_forward_passes(tiny_lm):
    """time_row_costs times the engine's runner on batches of n rows, every row sampled (as a
    draft's are); an engine that drafts has such a table, one that does not skips it; and
    measure_row_costs times a runner's model once a process."""
    engine = spec(tiny_lm)
    runner, seen = engine.runner, []
    forward = runner.forward

    def counting(batch):
        logits = forward(batch)
        seen.append((batch.num_tokens, logits.shape[0]))
        return logits

    runner.forward = counting
    costs = time_row_costs(runner, block_size=4, num_blocks=5, counts=(1, 3, 16, 17))
    assert costs.rows == [1, 3, 16]  # 17 rows need 3 pieces of 8 rows: 6 blocks of 4, not 5
    assert seen == [(1, 1), (3, 3), (16, 16)] * 3  # a warm-up round and 2 timed
    seen.clear()
    once = measure_row_costs(runner, block_size=4, num_blocks=5, counts=(2, 5))
    again = measure_row_costs(spec(tiny_lm).runner, block_size=4, num_blocks=5, counts=(2, 5))
    assert again is once and len(seen) == 2 * 3  # the second engine's table is the first's
    assert all(s > 0 for s in costs.seconds)
    assert sorted(costs.seconds) == costs.seconds
    assert spec(tiny_lm, num_speculative_tokens=0).row_costs.rows == [1]


def test_a_row_count_timed_slower_than_a_larger_one_is_cut_to_it():
    """Others' work only adds time: a point slower than a larger one is taken as the larger."""
    costs = RowCosts({1: 1.0, 2: 5.0, 4: 2.0, 8: 3.0})
    assert costs.seconds == [1.0, 2.0, 2.0, 3.0]
    assert costs.time(3) == 2.0 and costs.time(6) == 2.5 and costs.time(16) == 5.0


@pytest.mark.parametrize(
    ("running", "num_kv_blocks", "verified"), [(1, 5, 1), (1, 4, 0), (2, 9, 2), (2, 8, 0)]
)
def test_no_draft_while_the_pool_is_tight(tiny_lm, running, num_kv_blocks, verified):
    """Each 8-token prompt holds 2 blocks of 4; drafts need 2 free blocks per running sequence
    (its next block and its draft's) and one over: 3 free for one, 5 for two."""
    engine = verified_at_first_decode(tiny_lm, running, num_kv_blocks=num_kv_blocks)
    assert engine.stats.verifications == verified
    assert engine.stats.skipped["pool"] == running - verified


# ---------------------------------------------------------------- each sequence's acceptance


def test_plan_drafts_takes_the_rows_that_raise_tokens_per_second():
    sure, likely, unlikely = [1.0] * 5, [0.8**j for j in range(1, 6)], [0.2**j for j in range(1, 6)]
    assert plan_drafts([sure], FREE) == [5]
    assert plan_drafts([unlikely], FREE) == [5]  # free rows: any chance pays
    assert plan_drafts([sure, sure], DEAR) == [0, 0]
    # 0.8, 0.64, 0.51, 0.41: the 4th row would take 2.95 / 1.9 tokens per iteration to 3.36 / 2.2
    assert plan_drafts([likely], SOME) == [3]
    assert plan_drafts([unlikely], SOME) == [0]  # 0.2 < 0.3
    assert plan_drafts([likely, unlikely], STEP) == [5, 1]  # 8 rows: the best 6 chances
    assert plan_drafts([], SOME) == []


def test_acceptance_follows_the_drafts_and_probes_less_after_misses():
    acceptance = Acceptance()
    assert acceptance.probing and acceptance.chances(2) == [1.0, 1.0]  # new: a probe
    acceptance.verified(5, 0, probe_after=4)
    assert not acceptance.probing and acceptance.alpha == pytest.approx(1 / 3)
    acceptance.plain_steps = 4
    assert acceptance.probing  # waited long enough
    acceptance.verified(5, 0, probe_after=4)
    assert acceptance.wait == 8  # the probe missed: twice as long
    acceptance.verified(5, 5, probe_after=4)
    assert acceptance.wait == 4 and acceptance.alpha > 0.5


def draft_lengths(lm, prompt: list[int], max_tokens: int, propose, **config) -> list[int]:
    """One request alone; the draft verified in each of its decode iterations (0: none)."""
    engine = spec(lm, **{"block_size": 16, **config})  # (a draft may take one block more)
    engine.proposer.propose = propose
    lengths = []

    async def go():
        request = make_request(lm, prompt, max_tokens)
        await engine.submit(request)
        await engine.step()  # the prompt, and the first token
        while engine.scheduler.has_work:
            drafted = engine.stats.drafted
            await engine.step()
            lengths.append(engine.stats.drafted - drafted)
        return request

    request = asyncio.run(go())
    assert request.output_ids == reference(lm, prompt, max_tokens)
    return lengths


def test_a_sequence_whose_drafts_miss_stops_and_probes_again_ever_less_often(tiny_lm):
    """Every draft wrong, a row 0.3 of an iteration: the first draft is a probe (5), alpha
    falls below 0.3 and drafting stops (after one draft of 1 at alpha 1/3); after 4 plain steps
    a probe again, which misses, then after 8, then 16."""
    prompt = [5, 6, 7]
    answer = reference(tiny_lm, prompt, 60)

    def wrong(tokens, k=5):
        return [answer[len(tokens) - len(prompt)] + 1] * k

    lengths = draft_lengths(tiny_lm, prompt, 60, wrong, costs=SOME, spec_probe_after=4)
    probes = [i for i, n in enumerate(lengths) if n == 5]
    assert probes[0] == 0
    assert probes[:4] == [0, 6, 15, 32]  # 1 draft of 1, then 4, 8, 16 plain steps between
    assert lengths[1] == 1 and sum(lengths) == 5 * len(probes) + 1


def test_a_sequence_whose_drafts_hit_keeps_drafting_and_lengthens(tiny_lm):
    """Every draft right, the same costs: a probe of 5, then as alpha grows 4 and back to 5,
    never none."""
    prompt = [5, 6, 7]
    answer = reference(tiny_lm, prompt, 60)

    def right(tokens, k=5):
        return answer[len(tokens) - len(prompt) :][:k]

    lengths = draft_lengths(tiny_lm, prompt, 60, right, costs=SOME, spec_probe_after=4)
    assert lengths[0] == 5 and 0 not in lengths[:-1]  # (the last may have no room left)
    shortest = lengths.index(min(lengths[:-2]))
    assert min(lengths[:-2]) < 5 and 5 in lengths[shortest:-2]  # shortened, then lengthened


# ---------------------------------------------------------------- sampling: the distribution


ROWS = torch.tensor(
    [[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]
)  # the model's p at each row of a 2-token draft (4 live tokens of 16)


def verify_many(tokenizer, draft: list[int], draws: int) -> list[list[int]]:
    """The tokens `verify` keeps for the draft over ROWS, once per seed 0..draws-1."""
    logits = torch.full((len(draft) + 1, 16), float("-inf"))
    logits[:, :4] = torch.log(ROWS[: len(draft) + 1])
    kept = []
    for seed in range(draws):
        params = SamplingParams(temperature=1.0, seed=seed)
        request = Request([1, 2], params, 10, tokenizer, {0})
        request.sampler = Sampler(params)
        kept.append([token for token, _ in verify(request, logits, draft)])
    return kept


def assert_frequency(count: int, draws: int, p: float, what: str) -> None:
    """Within 5 standard errors of p (the draws are seeded: the outcome is fixed)."""
    assert abs(count / draws - p) <= 5 * (p * (1 - p) / draws) ** 0.5 + 1e-9, (what, count, p)


def test_the_rejection_rule_accepts_with_min_1_p_over_q_and_keeps_the_distribution(tokenizer):
    """Draft [2, 0] over rows p0, p1, p2, 12,000 seeded draws. The draft is a lookup, one-hot
    (q = 1), so token x is accepted with min(1, p/q) = p(x): the first with p0[2] = 0.3, the
    second, once the first is, with p1[0] = 0.4. A rejected draft token is never the one kept
    in its place: that token is drawn from p without it. So every kept token is distributed as
    its row's p, and a run ends at each position as often as the rule says."""
    draws = 12_000
    kept = verify_many(tokenizer, [2, 0], draws)
    lengths = Counter(len(k) for k in kept)
    assert_frequency(lengths[1], draws, 1 - 0.3, "first draft token rejected")
    assert_frequency(lengths[2], draws, 0.3 * (1 - 0.4), "second rejected")
    assert_frequency(lengths[3], draws, 0.3 * 0.4, "both accepted")
    first = Counter(k[0] for k in kept)
    for token, p in enumerate(ROWS[0].tolist()):
        assert_frequency(first[token], draws, p, f"first token {token}")
    rejected_first = Counter(k[0] for k in kept if len(k) == 1)
    assert rejected_first[2] == 0  # the rejected token is not drawn again
    after = [k[1] for k in kept if len(k) > 1]  # the first accepted: the second row decides
    for token, p in enumerate(ROWS[1].tolist()):
        assert_frequency(Counter(after)[token], len(after), p, f"second token {token}")
    third = [k[2] for k in kept if len(k) == 3]  # both accepted: the model's own from p2
    for token, p in enumerate(ROWS[2].tolist()):
        assert_frequency(Counter(third)[token], len(third), p, f"third token {token}")


@pytest.mark.parametrize(("token", "p"), [(3, 0.4), (0, 0.1), (5, 0.0)])
def test_a_draft_token_is_accepted_as_often_as_the_model_gives_it(tokenizer, token, p):
    """Acceptance rate = min(1, p/q) = p for each draft token, 0 for one the model rules out
    (token 5's logit is -inf)."""
    draws = 4_000
    kept = verify_many(tokenizer, [token], draws)
    accepted = sum(1 for k in kept if len(k) == 2)
    assert_frequency(accepted, draws, p, f"draft {token} accepted")
    assert all(k[0] == token for k in kept if len(k) == 2)


def test_sampled_outputs_match_step7s_in_distribution(tiny_lm):
    """Tiny model, top_k=4 so each position has 4 candidates: 600 seeds through each engine,
    the drafts forced to the greedy continuation (right or wrong by chance), and the
    histograms of the 2nd and of the 3rd token compared: total variation distance under 0.12
    each (fixed seeds; the expected distance of two such samples is about 0.04-0.08)."""
    prompt, seeds = [21, 22, 23], 600

    def tokens(engine) -> list[list[int]]:
        async def go():
            requests = []
            for seed in range(seeds):
                request = make_request(tiny_lm, prompt, 3, temperature=1.0, top_k=4, seed=seed)
                requests.append(request)
                await engine.submit(request)
            while engine.scheduler.has_work:
                await engine.step()
            return requests

        return [r.output_ids for r in asyncio.run(go())]

    engine = spec(tiny_lm, max_num_seqs=64, num_kv_blocks=1024)
    greedy = reference(tiny_lm, prompt, 3)
    engine.proposer.propose = lambda tokens, k=None: greedy[len(tokens) - 3 :][:2]
    with_spec, without = tokens(engine), tokens(plain(tiny_lm, num_kv_blocks=1024))
    assert engine.stats.verifications > 0
    for position in (1, 2):
        a = Counter(t[position] for t in with_spec)
        b = Counter(t[position] for t in without)
        distance = sum(abs(a[k] - b[k]) for k in set(a) | set(b)) / 2 / seeds
        assert distance < 0.12, (position, a, b)


# ---------------------------------------------------------------- rollback


def test_after_rejections_the_pool_and_prefix_cache_hold_what_plain_decoding_holds(tiny_lm):
    """Drafts half right, half wrong: the blocks named and their keys and values are those
    of a run without speculation (up to the last float bits of another batch's arithmetic)."""
    prompt = REPEATING[:13]

    def cache_after(engine):
        (request,) = run(engine, tiny_lm, [prompt], 20)
        names = {h: b for h, b in engine.blocks.by_hash.items()}
        return request.output_ids, names

    base = plain(tiny_lm)
    base_tokens, base_names = cache_after(base)
    engine = spec(tiny_lm)

    def half_wrong(tokens, k=5):  # the next two tokens, then three wrong ones
        done = len(tokens) - len(prompt)
        right = base_tokens[done : done + 2]
        wrong = [t + 1 for t in base_tokens[done + 2 : done + 5]]
        return (right + wrong)[:k]

    engine.proposer.propose = half_wrong
    tokens, names = cache_after(engine)
    assert tokens == base_tokens
    assert 0 < engine.stats.accepted < engine.stats.drafted
    assert set(names) == set(base_names)  # no rejected token named a block
    for name, block in names.items():
        ours = engine.kv.k[:, block * 4 : (block + 1) * 4]
        theirs = base.kv.k[:, base_names[name] * 4 : (base_names[name] + 1) * 4]
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the server


@pytest.mark.integration
def test_the_server_counts_drafts_and_answers_as_step7(start_server, tiny_model_dir):
    env = {"GATEWAY_MODEL": str(tiny_model_dir), "GATEWAY_RESPONSE_CACHE": "false"}
    server = start_server("step8_speculative", **env)
    body = {"model": "SmolLM2-135M-Instruct", "prompt": REPEATING, "max_tokens": 20,
            "temperature": 0}  # fmt: skip
    answer = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as stream:  # fmt: skip
        streamed = "".join(
            json.loads(line[6:])["choices"][0]["text"]
            for line in stream.iter_lines()
            if line.startswith("data: {") and '"choices": [{' in line
        )
    assert streamed == answer["choices"][0]["text"]
    assert metric(server.url, "gateway_spec_verifications_total") > 0
    accepted = metric(server.url, "gateway_spec_accepted_tokens_total")
    assert 0 < accepted <= metric(server.url, "gateway_spec_drafted_tokens_total")
    assert metric(server.url, "gateway_spec_accepted_by_position_total", position="1") > 0
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for reason in ("acceptance", "cost", "no_match", "pool"):
        assert f'gateway_spec_skipped_total{{reason="{reason}"}}' in text
    assert "drafted=" in server.log() and "accepted=" in server.log()
    # The bench reads the same counters, to report acceptance per level.
    from bench.runner import speculation

    counted = speculation(server.url)
    assert counted is not None and counted["accepted"] == accepted
    assert counted["drafted"] == metric(server.url, "gateway_spec_drafted_tokens_total")
