"""Validate before timing: a step's greedy answers must equal step 1's, token for token.

The reference is step 1 (one model, one request at a time: plain transformers decoding) in
float32, where greedy decoding is deterministic. Any later step that batches, caches or pages
must give the same text for the same prompt; a step that does not is reported and not timed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.workload import Workload, chat_body

REFERENCE_STEP = "step1_central_loader"
CHECK_DTYPE = "float32"


@dataclass
class CheckResult:
    passed: bool
    mismatches: list[dict] = field(default_factory=list)  # {id, expected, got}
    answers: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "mismatches": self.mismatches, "answers": self.answers}


def model_name(url: str) -> str:
    """The first model the server lists, so a --target serving another name still works."""
    response = httpx.get(url + "/v1/models", timeout=30.0)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def greedy_answer(url: str, body: dict, timeout_s: float = 120.0) -> str:
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout_s)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def answers(url: str, workload: Workload, model: str) -> dict[str, str]:
    """The server's greedy answer to each check prompt, one request at a time."""
    result = {}
    for prompt in workload.check_prompts:
        body = chat_body(workload, prompt, model, workload.check_max_tokens, stream=False)
        result[prompt.id] = greedy_answer(url, body)
    return result


def compare(reference: dict[str, str], got: dict[str, str]) -> CheckResult:
    mismatches = [
        {"id": pid, "expected": expected, "got": got.get(pid)}
        for pid, expected in reference.items()
        if got.get(pid) != expected
    ]
    return CheckResult(not mismatches, mismatches, got)


def verify(url: str, workload: Workload, model: str, reference: dict[str, str]) -> CheckResult:
    return compare(reference, answers(url, workload, model))


def load_reference(path: Path) -> dict[str, str]:
    """A reference file is {"answers": {prompt id: text}}; a results.json has one too."""
    data = json.loads(path.read_text())
    if "reference" in data:  # a whole results.json
        data = data["reference"]
    return dict(data["answers"])
