"""The versioned workload (bench/workload.json) and the request bodies built from it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKLOAD = Path(__file__).with_name("workload.json")


@dataclass(frozen=True)
class Prompt:
    id: str
    user: str
    shared_system: bool


@dataclass(frozen=True)
class Workload:
    version: int
    system_prompt: str
    prompts: tuple[Prompt, ...]
    check_prompts: tuple[Prompt, ...]
    check_max_tokens: int
    sha256: str  # of the file, so a result names exactly the prompts it measured

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if prompt.shared_system else []
        return [*system, {"role": "user", "content": prompt.user}]


def load_workload(path: Path = DEFAULT_WORKLOAD) -> Workload:
    raw = path.read_bytes()
    data = json.loads(raw)
    return Workload(
        version=int(data["version"]),
        system_prompt=data["system_prompt"],
        prompts=tuple(_prompt(p) for p in data["prompts"]),
        check_prompts=tuple(_prompt(p) for p in data["check_prompts"]),
        check_max_tokens=int(data["check_max_tokens"]),
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _prompt(item: dict) -> Prompt:
    return Prompt(item["id"], item["user"], bool(item.get("shared_system", False)))


def chat_body(
    workload: Workload, prompt: Prompt, model: str, max_tokens: int, stream: bool
) -> dict:
    """Greedy (temperature 0) so that every step is asked to do exactly the same work."""
    body = {
        "model": model,
        "messages": workload.messages(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body
