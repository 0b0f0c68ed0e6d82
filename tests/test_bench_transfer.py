"""bench.transfer, the cost of handing a prompt's KV blocks over: the decode engine's counters
read from its metrics page, one prompt's share of them per token its blocks held, and the
medians published where the READMEs' figure markers read them."""

from __future__ import annotations

from bench import publish, transfer
from bench.measured import publish_measurement

# The prefill side's counters (sent) after the decode side's (received), as a page of an
# engine that does both lists them: the reader must pick by label, not keep the last.
PAGE = """\
# HELP gateway_kv_transfer_blocks_total KV blocks handed over.
# TYPE gateway_kv_transfer_blocks_total counter
gateway_kv_transfer_blocks_total{direction="received"} 162.0
gateway_kv_transfer_blocks_total{direction="sent"} 7.0
# HELP gateway_kv_transfer_bytes_total Bytes of KV blocks handed over.
# TYPE gateway_kv_transfer_bytes_total counter
gateway_kv_transfer_bytes_total{direction="received"} 1.1943936e+08
gateway_kv_transfer_bytes_total{direction="sent"} 1.0
# HELP gateway_kv_transfer_seconds_total Time spent fetching KV blocks.
# TYPE gateway_kv_transfer_seconds_total counter
gateway_kv_transfer_seconds_total 0.5
# HELP gateway_requests_total Requests.
# TYPE gateway_requests_total counter
gateway_requests_total 3.0
"""


def test_the_decode_sides_counters_are_read_from_its_metrics_page() -> None:
    found = transfer.transfer_counters(PAGE)
    assert found == {"blocks": 162.0, "bytes": 119_439_360.0, "seconds": 0.5}


def test_a_page_before_any_fetch_reads_as_zero() -> None:
    assert transfer.transfer_counters("# nothing\n") == {"blocks": 0, "bytes": 0, "seconds": 0}


def test_one_prompts_share_is_per_token_its_blocks_held() -> None:
    before = {"blocks": 81.0, "bytes": 59_719_680.0, "seconds": 0.3}
    after = transfer.transfer_counters(PAGE)
    usage = {"prompt_tokens": 1300, "prompt_tokens_details": {"cached_tokens": 1296}}
    row = transfer.prompt_row(before, after, usage, block_size=16)
    assert row["blocks"] == 81 and row["block_tokens"] == 1296
    assert row["bytes"] == 59_719_680 and row["bytes_per_token"] == 46080.0
    assert row["transfer_s"] == 0.2 and row["us_per_token"] == 154.3  # 0.2 s / 1296
    assert row["cached_tokens"] == 1296 and row["prompt_tokens"] == 1300


def test_a_prompt_that_moved_nothing_has_no_per_token_figures() -> None:
    same = {"blocks": 5.0, "bytes": 10.0, "seconds": 1.0}
    row = transfer.prompt_row(same, same, {"prompt_tokens": 9}, block_size=16)
    assert row["blocks"] == 0 and row["cached_tokens"] == 0
    assert row["bytes_per_token"] is None and row["us_per_token"] is None


def test_published_medians_are_read_by_figure_markers(tmp_path) -> None:
    rows = [
        {"prompt_tokens": 1300, "cached_tokens": 1296, "blocks": 81, "bytes": 59_719_680,
         "bytes_per_token": 46080.0, "transfer_s": s, "us_per_token": s * 1e6 / 1296}
        for s in (0.30, 0.17, 0.21)
    ]  # fmt: skip
    table = transfer.report(rows)
    command = "python -m bench.transfer"
    publish_measurement("tr", transfer.entries(rows), table, command, {}, root=tmp_path)

    def fig(spec: str) -> str:
        return publish.figure(f"tr step10_disaggregated@1 {spec}", root=tmp_path)

    assert fig("transfer_s .2f") == "0.21"  # the median, not the mean (0.23)
    assert fig("us_per_token .0f") == "162"
    assert fig("bytes_per_token ,.0f") == "46,080"
    assert fig("cached_tokens ,.0f") == "1,296"
    assert "| 2 | 1300 | 1296 | 81 | 59.7 | 46080.0 | 0.170 |" in table
