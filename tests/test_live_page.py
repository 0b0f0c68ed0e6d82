"""GET /debug/engine, the engine's live page: what the snapshot reads, how the feed is shared
and bounded, the key, and (integration) the page in a real headless Chromium against a real
step 7 server under load, its figures checked against /metrics."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.errors import APIError
from step7_real_kv import live
from step7_real_kv.block_manager import BlockManager
from tests.conftest import tiny_client

BODY = {
    "model": "SmolLM2-135M-Instruct",
    "prompt": "one two three four five six seven eight nine ten " * 4,
    "temperature": 0,
}


def metric_values(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if not s.labels
    }


# ---------------------------------------------------------------- the snapshot


def test_pool_map_shows_free_cached_used_named_and_shared_blocks():
    blocks = BlockManager(num_blocks=6, block_size=2)
    a = blocks.allocate(3)  # blocks 0, 1, 2
    blocks.insert([1, 2, 3, 4], a)  # 0 and 1 full and named; 2 still filling
    blocks.share(a[:1])  # a second sequence holds block 0
    b = blocks.allocate(1)  # block 3
    blocks.insert([9, 9], b)
    blocks.free(b)  # freed, its prefix still findable
    assert live.pool_map(blocks) == "2nuc.."
    for _ in range(9):
        blocks.share(a[:1])
    assert live.pool_map(blocks)[0] == "+"  # 11 holders


def test_snapshot_counters_match_metrics(tiny_model_dir):
    with tiny_client("step7_real_kv", tiny_model_dir, num_kv_blocks=64, response_cache=False) as c:
        for _ in range(2):  # the second finds the first's prompt blocks
            assert c.post("/v1/completions", json={**BODY, "max_tokens": 3}).status_code == 200
        snap = live.engine_snapshot(c.app.state.serving.engine)
        scraped = metric_values(c.get("/metrics").text)
    counters = snap["counters"]
    assert counters["prefix_hit_tokens"] > 0
    pairs = {
        "kv_blocks_total": "gateway_kv_blocks_total",
        "kv_blocks_used": "gateway_kv_blocks_used",
        "prefix_hit_tokens": "gateway_prefix_cache_hit_tokens_total",
        "prefix_queried_tokens": "gateway_prefix_cache_queried_tokens_total",
        "preemptions": "gateway_preemptions_total",
    }
    assert {k: counters[k] for k in pairs} == {k: scraped[m] for k, m in pairs.items()}
    assert len(snap["pool"]) == 64 and set(snap["pool"]) <= set(".cun")
    assert snap["running"] == [] and snap["waiting"] == []
    # The strip: both requests' iterations, the first a prefill of the whole prompt.
    first = snap["iterations"][0]
    assert first["steps"][0][0] == "p" and first["steps"][0][1] > 16
    assert counters["iteration"] == snap["iterations"][-1]["n"] >= 6


def test_step8_snapshot_adds_acceptance_matching_metrics(tiny_model_dir):
    from step8_speculative.live import spec_snapshot

    with tiny_client("step8_speculative", tiny_model_dir, num_kv_blocks=64) as c:
        answer = c.post("/v1/completions", json={**BODY, "max_tokens": 24})
        page = c.get("/debug/engine")
        snap = spec_snapshot(c.app.state.serving.engine)
        scraped = metric_values(c.get("/metrics").text)
    assert answer.status_code == 200 and page.status_code == 200
    spec = snap["spec"]
    assert spec["spec_drafted_tokens"] > 0  # a repeating prompt: prompt lookup drafts
    assert spec == {
        "spec_verifications": scraped["gateway_spec_verifications_total"],
        "spec_drafted_tokens": scraped["gateway_spec_drafted_tokens_total"],
        "spec_accepted_tokens": scraped["gateway_spec_accepted_tokens_total"],
    }
    assert any(s[0] == "v" for it in snap["iterations"] for s in it["steps"])


# ---------------------------------------------------------------- the feed


def test_feed_takes_one_snapshot_per_interval_however_many_ask():
    now = [100.0]
    feed = live.LiveFeed(interval_s=0.2, clock=lambda: now[0])
    taken: list[int] = []

    def take() -> dict:
        taken.append(1)
        return {"n": len(taken)}

    assert feed.snapshots_taken == 0  # nobody watched: nothing taken
    first = [feed.current(take) for _ in range(5)]  # five watchers, one tick
    assert len(taken) == 1 and len(set(first)) == 1
    now[0] += 0.2
    assert '"n":2' in feed.current(take) and feed.snapshots_taken == 2


def test_feed_refuses_a_watcher_over_the_cap_and_counts_those_that_leave():
    feed = live.LiveFeed(max_watchers=2)
    feed.open()
    feed.open()
    with pytest.raises(APIError) as refused:
        feed.open()
    assert refused.value.status == 429 and refused.value.code == "too_many_watchers"

    async def watch_one_event() -> str:
        stream = feed.stream(lambda: {"x": 1})
        await anext(stream)  # the retry line
        event = await anext(stream)
        await stream.aclose()  # the client left
        return event

    assert asyncio.run(watch_one_event()).startswith('data: {"at":')
    assert feed.watchers == 1
    feed.open()  # room again


def test_page_and_feed_are_behind_the_api_key(tiny_model_dir):
    with tiny_client("step7_real_kv", tiny_model_dir, num_kv_blocks=16, api_key="k") as c:
        without = c.get("/debug/engine")
        with_query = c.get("/debug/engine?access_token=k")
        wrong = c.get("/debug/engine?access_token=nope")
        sources = c.get("/debug/engine/sources", headers={"Authorization": "Bearer k"})
        api_by_query = c.get("/v1/models?access_token=k")  # the API wants the header
    assert without.status_code == 401 and without.json()["error"]["code"] == "invalid_api_key"
    assert with_query.status_code == 200 and "<canvas" in with_query.text
    assert wrong.status_code == 401
    assert sources.json() == [{"name": "engine", "events": "engine/events"}]
    assert api_by_query.status_code == 401


# ---------------------------------------------------------------- in a real browser

KEY = "live-page-key"
SYSTEM = (
    "You are a careful assistant for a small bakery. Answer in one short paragraph, "
    "politely, and mention the opening hours when they matter. "
) * 3


def browser_binaries() -> tuple[str | None, str | None]:
    """(browser, its driver): GATEWAY_CHROMIUM and GATEWAY_CHROMEDRIVER when set, else the
    distribution's chromium and chromedriver on the PATH."""
    return (
        os.environ.get("GATEWAY_CHROMIUM") or shutil.which("chromium"),
        os.environ.get("GATEWAY_CHROMEDRIVER") or shutil.which("chromedriver"),
    )


@pytest.fixture
def browser(tmp_path):
    """Debian's chromium, headless, driven by selenium through Debian's chromedriver (nothing
    downloaded). Missing: skipped here, a failure in CI (GATEWAY_REQUIRE_SERVICES=1)."""
    chromium, chromedriver = browser_binaries()
    if chromium is None or chromedriver is None:
        message = (
            "chromium or chromedriver not installed (apt-get install chromium chromium-driver)"
        )
        if os.environ.get("GATEWAY_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1300",
                 f"--user-data-dir={tmp_path / 'chromium'}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    yield driver
    driver.quit()


def figures(driver) -> dict[str, str]:
    """The first panel's figures, as the page shows them."""
    return driver.execute_script(
        "const out = {};"
        "document.querySelectorAll('.panel [data-fig]').forEach("
        "  (el) => { out[el.dataset.fig] = el.textContent; });"
        "return out;"
    )


POOL_PIXELS = """
const canvas = document.querySelector('.panel canvas.pool');
if (!canvas || !canvas.width) return null;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const counts = {free: 0, used: 0};
for (let i = 0; i < data.length; i += 4) {
  const rgb = data[i] << 16 | data[i + 1] << 8 | data[i + 2];
  if (rgb === 0xe8e8e8) counts.free++;
  if (rgb === 0xf5b971 || rgb === 0xe07b24 || rgb === 0x7b4bc4) counts.used++;
}
counts.blocks = Number(canvas.dataset.blocks || 0);
counts.columns = Number(document.querySelector('.panel canvas.strip').dataset.columns || 0);
return counts;
"""


def wait_for(check, timeout: float = 30.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout} s")
        time.sleep(every)


def load(url: str, stop: threading.Event, users: int = 16) -> list[int]:
    """`users` clients, each sending requests (one shared system prompt) until `stop`."""
    statuses: list[int] = []

    def user(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as client:
            n = 0
            while not stop.is_set():
                n += 1
                body = {"model": BODY["model"], "max_tokens": 48, "temperature": 0,
                        "prompt": f"{SYSTEM}Question {i}.{n}: when do you open?"}  # fmt: skip
                statuses.append(client.post("/v1/completions", json=body, timeout=120).status_code)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=120)
    return statuses


METRIC_OF = {
    "kv_blocks_total": "gateway_kv_blocks_total",
    "kv_blocks_used": "gateway_kv_blocks_used",
    "prefix_hit_tokens": "gateway_prefix_cache_hit_tokens_total",
    "prefix_queried_tokens": "gateway_prefix_cache_queried_tokens_total",
    "prefix_evictions": "gateway_prefix_cache_evictions_total",
    "preemptions": "gateway_preemptions_total",
}


@pytest.mark.integration
def test_live_page_in_a_real_browser(start_server, browser, tmp_path):
    server = start_server("step7_real_kv", GATEWAY_API_KEY=KEY, GATEWAY_RESPONSE_CACHE="false")
    assert httpx.get(server.url + "/debug/engine").status_code == 401
    browser.get(f"{server.url}/debug/engine?access_token={KEY}")
    assert "access_token" not in browser.current_url  # the page took the key out of the bar
    drawn = wait_for(lambda: (p := browser.execute_script(POOL_PIXELS)) and p["blocks"] and p)
    assert drawn["blocks"] == 2048 and drawn["free"] > 0 and drawn["used"] == 0

    stop = threading.Event()
    loader = threading.Thread(target=lambda: statuses.extend(load(server.url, stop)))
    statuses: list[int] = []
    loader.start()
    try:
        seen = watch_while_loaded(browser, tmp_path)
    finally:
        stop.set()
        loader.join(timeout=180)
    assert statuses and set(statuses) == {200}
    # The figures moved: new iterations, blocks taken, sequences running, columns in the strip.
    assert len(set(seen["iteration"])) >= 3 and max(seen["iteration"]) > min(seen["iteration"])
    assert max(seen["kv_blocks_used"]) > 0 and max(seen["running"]) > 0
    assert max(seen["used_pixels"]) > 0 and max(seen["columns"]) > 0
    # Idle again, the page says what /metrics says.
    scraped = metric_values(httpx.get(server.url + "/metrics").text)
    want = {fig: str(int(scraped[metric])) for fig, metric in METRIC_OF.items()}
    wait_for(lambda: {k: figures(browser)[k] for k in want} == want, timeout=10)
    assert int(want["prefix_hit_tokens"]) > 0  # the shared system prompt was found again
    assert (tmp_path / "live_page.png").stat().st_size > 10_000
    check_watcher_cap(server.url)


def watch_while_loaded(browser, tmp_path: Path) -> dict[str, list[int]]:
    """Samples the page's figures for a while under load; the screenshot is taken when the
    pool is fullest."""
    seen: dict[str, list[int]] = {k: [] for k in
                                  ("iteration", "kv_blocks_used", "running", "used_pixels",
                                   "columns")}  # fmt: skip
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        time.sleep(0.5)
        shown, pixels = figures(browser), browser.execute_script(POOL_PIXELS)
        for name in ("iteration", "kv_blocks_used", "running"):
            if shown[name].isdigit():
                seen[name].append(int(shown[name]))
        seen["used_pixels"].append(pixels["used"])
        seen["columns"].append(pixels["columns"])
        if pixels["used"] >= max(seen["used_pixels"]):
            browser.save_screenshot(str(tmp_path / "live_page.png"))
    target = os.environ.get("GATEWAY_LIVE_SCREENSHOT")  # where to keep it (the README's)
    if target:
        shutil.copy(tmp_path / "live_page.png", target)
    return seen


def check_watcher_cap(url: str) -> None:
    """The page holds one stream; MAX_WATCHERS - 1 more fit, the next is refused with a 429,
    and once they leave there is room again."""
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client, ExitStack() as open_:
        for _ in range(live.MAX_WATCHERS - 1):
            stream = open_.enter_context(client.stream("GET", "/debug/engine/events"))
            assert stream.status_code == 200
        with client.stream("GET", "/debug/engine/events") as refused:  # headers only
            assert refused.status_code == 429
            assert b"too_many_watchers" in refused.read()
    wait_for(lambda: _stream_opens(url, headers), timeout=10)


def _stream_opens(url: str, headers: dict[str, str]) -> bool:
    with httpx.stream("GET", url + "/debug/engine/events", headers=headers, timeout=10) as r:
        return r.status_code == 200


@pytest.mark.integration
def test_router_page_shows_its_engines_side_by_side(start_server, browser, tiny_model_dir):
    engines = [
        start_server("step7_real_kv", GATEWAY_MODEL=str(tiny_model_dir), GATEWAY_NUM_KV_BLOCKS=n)
        for n in ("64", "128")
    ]
    upstreams = ",".join(e.url for e in engines)
    router = start_server("step9_router", GATEWAY_UPSTREAMS=upstreams, GATEWAY_API_KEY=KEY)
    names = sorted(f"127.0.0.1:{e.port}" for e in engines)  # the router's replica names
    auth = {"Authorization": f"Bearer {KEY}"}
    sources = httpx.get(router.url + "/debug/engine/sources", headers=auth).json()
    assert [s["name"] for s in sources] == names
    unknown = httpx.get(router.url + "/debug/engine/events?replica=nowhere:1", headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "no_such_replica"

    browser.get(f"{router.url}/debug/engine?access_token={KEY}")
    panels = """return [...document.querySelectorAll('.panel')].map((p) => [
        p.querySelector('.name').textContent, p.querySelector('canvas.pool').dataset.blocks,
        p.querySelector('[data-fig=kv_blocks_total]').textContent]);"""
    shown = wait_for(lambda: (p := browser.execute_script(panels)) and all(x[1] for x in p) and p)
    sizes = {f"127.0.0.1:{e.port}": n for e, n in zip(engines, ("64", "128"), strict=True)}
    assert shown == [[name, sizes[name], sizes[name]] for name in names]  # drawn, and counted
