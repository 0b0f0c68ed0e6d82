"""Step 9's routing policies, as pure functions: no HTTP, no model.

While the fleet is balanced a prefix sticks to the replica that has it; past the imbalance guard
(exactly at it, and one over) the least loaded replica gets it; a replica that is not a candidate
is never chosen, whatever its record holds; round robin and the power of two choices at their
edges (one candidate, ties, none). Also the small pure parts of the proxy and of the local
engines: the end-of-stream watch, Retry-After, and the environment an engine is started with.
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from common import protocol
from step6_backpressure.lifecycle import Lifecycle
from step9_router.proxy import Proxy, StreamEnd, _retry_after_s
from step9_router.replicas import engine_env
from step9_router.routing import (
    PrefixRecord,
    Router,
    RoutingConfig,
    cache_aware,
    imbalanced,
    least_loaded,
    prefix_blocks,
    prompt_text,
    round_robin,
)
from step9_router.server import Config
from step9_router.upstreams import UpstreamConfig, UpstreamPool, resolve

A, B, C = "http://a:1", "http://b:1", "http://c:1"
SYSTEM = "You are the help desk of a library. " * 20  # ~700 characters: 11 blocks of 64


def config(**overrides) -> RoutingConfig:
    return RoutingConfig(**{"imbalance_abs": 4, "imbalance_rel": 1.5, **overrides})


def prompt(question: str, system: str = SYSTEM) -> str:
    return f"<system>{system}\n<user>{question}\n"


# ---------------------------------------------------------------- naming prefixes


def test_block_names_are_chained_so_equal_names_mean_equal_prefixes():
    one = prefix_blocks("a" * 64 + "b" * 64 + "tail", 64)
    two = prefix_blocks("a" * 64 + "b" * 64 + "other tail", 64)
    assert len(one) == 3 and one[:2] == two[:2] and one[2] != two[2]  # the partial tail is named
    changed_first = prefix_blocks("z" + "a" * 63 + "b" * 64, 64)
    assert not set(changed_first) & set(one)  # same second block, different prefix: no match
    assert prefix_blocks("", 64) == []
    assert len(prefix_blocks("x", 64)) == 1  # shorter than a block: still one name


def test_record_matches_the_leading_run_and_forgets_the_least_recently_used():
    names = prefix_blocks("x" * 64 * 4, 64)
    record = PrefixRecord(capacity=4)
    record.insert(names[:2])
    assert record.match(names) == 2
    assert record.match([names[0], names[2], names[1]]) == 1  # the leading run only
    record.insert(names)  # exactly full
    assert len(record) == 4 and record.match(names) == 4
    record.insert(prefix_blocks("other", 64))  # one over: the oldest name goes
    assert len(record) == 4 and record.match(names) == 0


def test_prompt_text_keeps_roles_order_and_token_ids():
    chat = protocol.parse_chat_request(
        b'{"model": "m", "messages": [{"role": "developer", "content": "be brief"},'
        b' {"role": "user", "content": [{"type": "text", "text": "hi"}, '
        b'{"type": "text", "text": " there"}]}]}'
    )
    assert prompt_text(chat) == "<system>be brief\n<user>hi there\n"
    ids = protocol.parse_completion_request(b'{"model": "m", "prompt": [1, 22, 333]}')
    assert prompt_text(ids) == "1 22 333"
    text = protocol.parse_completion_request(b'{"model": "m", "prompt": "Once"}')
    assert prompt_text(text) == "Once"


# ---------------------------------------------------------------- cache_aware


def test_while_balanced_the_same_prefix_goes_to_the_same_replica():
    router = Router(config(), seed=1)
    loads = {A: 0, B: 0, C: 0}
    first = router.choose([A, B, C], loads, router.names(prompt("q0")))
    assert first.reason == "no_match"  # nothing recorded yet: the least loaded
    for i in range(1, 30):
        loads[first.upstream] = i % 5  # busier than the others, but within the guard (4)
        decision = router.choose([A, B, C], loads, router.names(prompt(f"question {i}")))
        assert (decision.upstream, decision.reason) == (first.upstream, "prefix_match")
        assert decision.matched_blocks >= 11


def test_another_prefix_goes_to_the_least_loaded_and_then_sticks_there():
    router = Router(config(), seed=2)
    tenant_a = router.choose([A, B], {A: 0, B: 0}, router.names(prompt("q", "tenant A " * 50)))
    other = B if tenant_a.upstream == A else A
    loads = {tenant_a.upstream: 1, other: 0}
    tenant_b = router.choose([A, B], loads, router.names(prompt("q", "tenant B " * 50)))
    assert (tenant_b.upstream, tenant_b.reason) == (other, "no_match")
    again = router.choose([A, B], {A: 0, B: 0}, router.names(prompt("q2", "tenant B " * 50)))
    assert (again.upstream, again.reason) == (other, "prefix_match")


def test_past_the_imbalance_guard_the_least_loaded_gets_it():
    cfg = config(imbalance_abs=4, imbalance_rel=1.5)
    router = Router(cfg, seed=3)
    names = router.names(prompt("q"))
    router.remember(A, names)
    at_guard = router.choose([A, B], {A: 4, B: 0}, names)  # 4 more: exactly at the guard
    assert (at_guard.upstream, at_guard.reason) == (A, "prefix_match")
    one_over = router.choose([A, B], {A: 5, B: 0}, names)
    assert (one_over.upstream, one_over.reason) == (B, "imbalance")
    assert router.records[B].match(names) == len(names)  # B learnt it: both hold it now
    # Relative too: 20 vs 29 is 9 more (over 4) but under 1.5x, so the prefix still wins.
    records, rng = {A: router.records[A]}, random.Random(0)
    assert cache_aware(names, [A, B], {A: 29, B: 20}, records, cfg, rng).upstream == A
    assert cache_aware(names, [A, B], {A: 31, B: 20}, records, cfg, rng).reason == "imbalance"


def test_imbalance_needs_both_the_absolute_and_the_relative_excess():
    cfg = config(imbalance_abs=4, imbalance_rel=1.5)
    assert not imbalanced(4, 0, cfg) and imbalanced(5, 0, cfg)
    assert not imbalanced(30, 20, cfg) and imbalanced(31, 20, cfg)
    assert not imbalanced(5, 4, cfg)


def test_a_short_match_is_not_worth_a_detour():
    cfg = config(match_threshold=0.5)
    names = prefix_blocks("s" * 64 * 4 + "u" * 64 * 6, 64)  # 10 blocks, 4 shared
    records = {A: PrefixRecord(100)}
    records[A].insert(names[:4])
    decision = cache_aware(names, [A, B], {A: 0, B: 0}, records, cfg, random.Random(0))
    assert decision.reason == "no_match" and decision.matched_blocks == 4
    records[A].insert(names[:5])  # 5 of 10: exactly the threshold
    decision = cache_aware(names, [A, B], {A: 3, B: 0}, records, cfg, random.Random(0))
    assert (decision.upstream, decision.reason) == (A, "prefix_match")


def test_equal_matches_go_to_the_less_loaded():
    names = prefix_blocks(prompt("q"), 64)
    records = {A: PrefixRecord(100), B: PrefixRecord(100)}
    records[A].insert(names)
    records[B].insert(names)
    decision = cache_aware(names, [A, B], {A: 3, B: 1}, records, config(), random.Random(0))
    assert (decision.upstream, decision.reason) == (B, "prefix_match")


def test_a_replica_that_is_not_a_candidate_is_never_chosen():
    for policy in ("round_robin", "least_loaded", "cache_aware"):
        router = Router(config(policy=policy), seed=4)
        names = router.names(prompt("q"))
        router.remember(A, names)  # A holds the prefix, is idle, and is out
        for _ in range(50):
            decision = router.choose([B, C], {A: 0, B: 7, C: 9}, names)
            assert decision.upstream in (B, C), policy
    router = Router(config(), seed=5)
    router.remember(A, router.names(prompt("q")))
    router.forget(A)  # taken out as unreachable: when it is back, its cache may be empty
    assert router.choose([A, B], {A: 0, B: 0}, router.names(prompt("q"))).reason == "no_match"


# ---------------------------------------------------------------- round robin, least loaded


def test_round_robin_takes_turns_and_wraps():
    router = Router(config(policy="round_robin"))
    picks = [router.choose([A, B, C], {}, []).upstream for _ in range(7)]
    assert picks == [A, B, C, A, B, C, A]
    assert {router.choose([B], {}, []).upstream for _ in range(3)} == {B}  # one candidate
    assert round_robin([A, B], 5).upstream == B
    with pytest.raises(ValueError):
        router.choose([], {}, [])


def test_least_loaded_never_picks_the_busiest_and_breaks_ties_at_random():
    rng = random.Random(6)
    loads = {A: 3, B: 1, C: 2}
    picks = [least_loaded([A, B, C], loads, rng).upstream for _ in range(300)]
    assert A not in picks and set(picks) == {B, C}  # C wins when paired with A
    assert {least_loaded([A, B], {A: 1, B: 0}, rng).upstream for _ in range(50)} == {B}
    assert {least_loaded([A, B], {A: 2, B: 2}, rng).upstream for _ in range(50)} == {A, B}
    assert least_loaded([C], {C: 99}, rng).upstream == C  # one candidate, however busy
    with pytest.raises(ValueError):
        Router(config(policy="least_loaded")).choose([], {}, [])


def test_routing_config_is_checked():
    with pytest.raises(ValueError, match="policy"):
        RoutingConfig(policy="random")
    with pytest.raises(ValueError, match="match_threshold"):
        RoutingConfig(match_threshold=0)
    with pytest.raises(ValueError):
        RoutingConfig(imbalance_rel=0.5)


# ---------------------------------------------------------------- the proxy's small parts


def test_the_end_of_a_stream_is_seen_even_split_across_chunks():
    end = StreamEnd()
    for chunk in (b'data: {"choices": []}\n\ndata: [DO', b"NE]\n\n"):
        end.feed(chunk)
    assert end.seen and end.done and not end.error
    cut = StreamEnd()
    cut.feed(b'data: {"choices": [{"text": "DONE"}]}\n\n')
    assert not cut.seen  # the word in a token is not the end marker
    failed = StreamEnd()
    failed.feed(b'data: {"err')
    failed.feed(b'or": {"message": "queue timeout"}}\n\n')
    assert failed.seen and failed.error


def test_retry_after_is_read_in_seconds_and_bounded():
    assert _retry_after_s("3") == 3.0
    assert _retry_after_s(None) == 1.0 and _retry_after_s("soon") == 1.0
    assert _retry_after_s("-2") == 0.0 and _retry_after_s("9999") == 60.0


def test_local_engines_get_the_engine_settings_but_not_the_routers_own(monkeypatch):
    for name in ("GATEWAY_API_KEY", "GATEWAY_POLICY", "GATEWAY_REDIS_URL", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    monkeypatch.setenv("GATEWAY_NUM_KV_BLOCKS", "512")  # the engines' own knobs pass as env
    cfg = Config(
        port=9000, api_key="secret", dtype="bfloat16", max_waiting_requests=7, log_format="json"
    )
    env = engine_env(cfg, 12345, count=2)
    assert env["OMP_NUM_THREADS"] == "2"  # 4 cores shared by 2 engines
    assert env["GATEWAY_PORT"] == "12345" and env["GATEWAY_HOST"] == "127.0.0.1"
    assert env["GATEWAY_DTYPE"] == "bfloat16" and env["GATEWAY_MAX_WAITING_REQUESTS"] == "7"
    assert env["GATEWAY_LOG_FORMAT"] == "json" and env["GATEWAY_READY_WHEN_SATURATED"] == "false"
    assert env["GATEWAY_RESPONSE_CACHE"] == "false"  # the router caches, once, in front
    assert env["GATEWAY_NUM_KV_BLOCKS"] == "512"
    assert not {"GATEWAY_API_KEY", "GATEWAY_POLICY", "GATEWAY_REDIS_URL"} & set(env)


# ---------------------------------------------------------------- the pool


def pool_of(*urls: str) -> tuple[UpstreamPool, list[str]]:
    forgotten: list[str] = []
    pool = UpstreamPool(UpstreamConfig(upstreams=",".join(urls)), on_removed=forgotten.append)
    pool.set_urls(urls)
    return pool, forgotten


def test_the_pool_offers_only_ready_replicas_that_are_not_resting():
    pool, forgotten = pool_of(A, B, C)
    assert pool.candidates() == []  # nothing is ready before its first poll
    for upstream in pool.upstreams.values():
        pool.put_back(upstream)
    a, b, c = pool.upstreams.values()
    b.rest(30)  # a 429 asked for 30 s
    pool.take_out(c, "health poll failed", unreachable=True)
    assert pool.candidates() == [a] and pool.candidates(exclude=[a]) == []
    assert forgotten == [C]  # unreachable: it may come back with an empty cache
    pool.take_out(a, "draining")  # not ready, but reachable: its record stays
    assert forgotten == [C]
    pool.set_urls([A, B])  # C is no longer discovered
    assert list(pool.upstreams) == [A, B] and forgotten == [C, C]


def test_a_dns_name_gives_one_upstream_per_address():
    assert "http://127.0.0.1:8123" in asyncio.run(resolve("dns://localhost:8123"))


def test_the_fleets_refusal_says_429_while_any_replica_is_only_busy():
    pool, _ = pool_of(A, B)
    proxy = Proxy(pool, Router(config()), httpx.AsyncClient(), Lifecycle(Config()))
    none_ready = proxy.unavailable([])
    assert (none_ready.status, none_ready.code) == (503, "no_upstream")
    for upstream in pool.upstreams.values():
        pool.put_back(upstream)
        upstream.rest(2.5)
    busy = proxy.unavailable([429])
    assert (busy.status, busy.code, busy.headers["Retry-After"]) == (429, "upstreams_busy", "3")
    draining = proxy.unavailable([503, 503])
    assert (draining.status, draining.code) == (503, "upstreams_unavailable")
    assert proxy.unavailable([503, 429]).status == 429  # one was only busy
    assert proxy.reasons == {
        "rejected:no_upstream": 1,
        "rejected:upstreams_busy": 2,
        "rejected:upstreams_unavailable": 1,
    }
