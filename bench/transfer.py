"""What does handing a prompt's KV blocks over cost? Bytes and seconds per prompt token, step 10.

    python -m bench.transfer                                   # starts step 10, 3 prompts
    python -m bench.transfer --prompts 3 --tokens 1300 --publish transfer
    python -m bench.transfer --transport http                  # over the socket, not /dev/shm
    python -m bench.transfer --url http://127.0.0.1:8000       # a router already running

Unique prompts of about `--tokens` tokens (each begins with a fresh tag, so no engine holds
any of it) are sent one after another with `max_tokens` 4 through step 10's router, which has
the prefill engine prefill them and the decode engine fetch their KV blocks. Around each, the
decode engine's counters (its GET /metrics; the router's GET /health names the engine) say what
that fetch moved: `gateway_kv_transfer_blocks_total` and `gateway_kv_transfer_bytes_total`
received, and `gateway_kv_transfer_seconds_total`, the time the decode side spent fetching (the
request to the prefill engine, both sides' copies, the write into its pool). Per prompt: blocks
and bytes moved, bytes per token the blocks held, the fetch's seconds and microseconds per
token, and `usage.prompt_tokens_details.cached_tokens` (the prompt tokens the decode engine did
not compute).

`--publish NAME` writes bench/charts/NAME/results.json (bench/measured.py): the entry
`step10_disaggregated` at level 1 (one prompt at a time), its summary the medians over the
prompts, so that a README quotes `<!-- bench:fig NAME step10_disaggregated@1 us_per_token -->`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.measured import Entries, finish, target, valid_name

MODEL = "SmolLM2-135M-Instruct"
STEP = "step10_disaggregated"
BLOCK_SIZE = 16  # token slots per KV block, the engines' default (step 7's `block_size`)
COUNTERS = {  # sample name -> the direction label it must carry, or None for no label
    "gateway_kv_transfer_blocks_total": "received",
    "gateway_kv_transfer_bytes_total": "received",
    "gateway_kv_transfer_seconds_total": None,
}


def transfer_counters(metrics_text: str) -> dict[str, float]:
    """The decode side's transfer counters from a Prometheus text page: `blocks`, `bytes`
    (received) and `seconds`; 0 for a counter the page lacks (no fetch yet)."""
    found = {"blocks": 0.0, "bytes": 0.0, "seconds": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name not in COUNTERS:
                continue
            if sample.labels.get("direction") != COUNTERS[sample.name]:
                continue
            key = sample.name.removeprefix("gateway_kv_transfer_").removesuffix("_total")
            found[key] = sample.value
    return found


def prompt_row(before: dict, after: dict, usage: dict, block_size: int) -> dict:
    """One prompt's transfer: what the counters moved between before and after, per token the
    blocks held, beside its usage."""
    blocks = int(after["blocks"] - before["blocks"])
    nbytes = int(after["bytes"] - before["bytes"])
    seconds = after["seconds"] - before["seconds"]
    tokens = blocks * block_size
    details = usage.get("prompt_tokens_details") or {}
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "cached_tokens": details.get("cached_tokens", 0),
        "blocks": blocks,
        "block_tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": round(nbytes / tokens, 1) if tokens else None,
        "transfer_s": round(seconds, 4),
        "us_per_token": round(seconds * 1e6 / tokens, 1) if tokens else None,
    }


def summary(rows: list[dict]) -> dict:
    """The median over the prompts of every number each of them has."""
    keys = [k for k in rows[0] if all(r.get(k) is not None for r in rows)]
    return {k: statistics.median(r[k] for r in rows) for k in keys}


def entries(rows: list[dict]) -> Entries:
    return {STEP: {1: {"summary": summary(rows), "prompts": rows}}}


def report(rows: list[dict]) -> str:
    lines = [
        "| prompt | prompt tokens | cached tokens | blocks | MB | bytes/token | transfer s "
        "| us/token |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rows, start=1):
        cells = [i, r["prompt_tokens"], r["cached_tokens"], r["blocks"], f"{r['bytes'] / 1e6:.1f}",
                 r["bytes_per_token"], f"{r['transfer_s']:.3f}", r["us_per_token"]]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- talking to the router


def decode_engine(client: httpx.Client) -> str:
    """The decode engine's URL, from the router's GET /health (its pools, host:port each)."""
    engines = list(client.get("/health").json().get("decode", {}))
    if len(engines) != 1:
        raise RuntimeError(f"want one decode engine to read the counters of, found {engines}")
    return f"http://{engines[0]}"


def unique_prompt(client: httpx.Client, tag: str, tokens: int) -> str:
    """About `tokens` tokens of text no earlier prompt began with: numbered sentences after a
    fresh tag, cut to that many tokens by the server's own tokenizer."""
    text = f"Notes {tag}. " + " ".join(
        f"Line {i} of {tag}: the oven at station {i % 7} ran {i * 3 % 50} minutes."
        for i in range(tokens // 8)
    )
    ids = _post(client, "/tokenize", {"model": MODEL, "prompt": text})["tokens"]
    if len(ids) < tokens:
        raise RuntimeError(f"the text has {len(ids)} tokens, fewer than {tokens}")
    return _post(client, "/detokenize", {"model": MODEL, "tokens": ids[:tokens]})["prompt"]


def one_prompt(client: httpx.Client, engine: str, text: str, block_size: int) -> dict:
    before = transfer_counters(httpx.get(engine + "/metrics", timeout=30).text)
    body = {"model": MODEL, "prompt": text, "max_tokens": 4, "temperature": 0}
    usage = _post(client, "/v1/completions", body)["usage"]
    after = transfer_counters(httpx.get(engine + "/metrics", timeout=30).text)
    return prompt_row(before, after, usage, block_size)


def _post(client: httpx.Client, path: str, body: dict) -> dict:
    answer = client.post(path, json=body, headers={"cache-control": "no-cache"})
    answer.raise_for_status()
    return answer.json()


def measure(url: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    with httpx.Client(base_url=url, timeout=600) as client:
        engine = decode_engine(client)
        for _ in range(args.prompts):
            text = unique_prompt(client, uuid.uuid4().hex[:12], args.tokens)
            rows.append(one_prompt(client, engine, text, args.block_size))
            print(f"[transfer] {rows[-1]}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__)
    parser.add_argument("--url", default="", help="measure a running step 10 router instead")
    parser.add_argument("--prompts", type=int, default=3, help="unique prompts, one at a time")
    parser.add_argument("--tokens", type=int, default=1300, help="tokens of each prompt")
    parser.add_argument(
        "--block-size", type=int, default=BLOCK_SIZE, help="the engines' block_size"
    )
    parser.add_argument(
        "--transport",
        choices=["shm", "http"],
        default="",
        help="the started router's kv_transport (default: its own, shm for its local engines)",
    )
    parser.add_argument("--publish", default="", metavar="NAME", help="bench/charts/NAME")
    args = parser.parse_args(argv)
    if args.publish and not valid_name(args.publish):
        parser.error("--publish takes a folder name under bench/charts, like transfer")
    if args.prompts < 1 or args.tokens < 1:
        parser.error("--prompts and --tokens are at least 1")
    if args.transport and args.url:
        parser.error("--transport sets up the router it starts, not one at --url")
    if args.transport:
        os.environ["GATEWAY_KV_TRANSPORT"] = args.transport  # the router passes it on
    with target(args.url, STEP, "transfer", ready_s=600) as (url, _):
        rows = measure(url, args)
    config = {k: v for k, v in vars(args).items() if k != "publish"}
    finish("transfer", argv, report(rows), args.publish, entries(rows), config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
