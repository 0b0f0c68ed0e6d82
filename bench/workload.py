"""The versioned workloads (bench/workload*.json) and the request bodies built from them.

A workload is either a list of prompts taken round-robin (workload.json, workload_grounded.json)
or a set of request classes whose prompts are generated from a seed, never repeated
(workload_decode.json, workload_long.json, workload_mixed.json; bench/generate.py). A class
says how many users send it (the level's users, or a fixed number beside them), what prompts it
sends and how many tokens each answer may have.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bench import generate

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_WORKLOAD = BENCH_DIR / "workload.json"
LEVEL = "level"  # a class's users: as many as the level's concurrency


@dataclass(frozen=True)
class Prompt:
    id: str
    user: str
    shared_system: bool
    system: str | None = None  # its own system message (generated prompts)


@dataclass(frozen=True)
class RequestClass:
    name: str
    users: int | str  # LEVEL, or a fixed number of users running beside the level's
    prompt: str  # the generator: "story" (short prompt, long answer) or "document" (long prompt)
    max_tokens: int | None = None  # pinned answer length; None: the profile's max_tokens
    prompt_tokens: tuple[int, int] | None = None  # a document prompt's length, whole prompt

    def __post_init__(self) -> None:
        if self.prompt not in ("story", "document"):
            raise ValueError(f"class {self.name}: unknown prompt generator {self.prompt!r}")
        if self.prompt == "document" and self.prompt_tokens is None:
            raise ValueError(f"class {self.name}: a document class needs prompt_tokens")
        if self.users != LEVEL and not (isinstance(self.users, int) and self.users >= 1):
            raise ValueError(f"class {self.name}: users is {LEVEL!r} or a positive number")


@dataclass(frozen=True)
class Workload:
    version: int
    system_prompt: str
    prompts: tuple[Prompt, ...]
    check_prompts: tuple[Prompt, ...]
    check_max_tokens: int
    sha256: str  # of the file, so a result names exactly the prompts it measured
    name: str = "default"
    seed: int = 0
    classes: tuple[RequestClass, ...] = ()  # empty: the prompts, round-robin, by every user

    def messages(self, prompt: Prompt) -> list[dict[str, str]]:
        system = prompt.system or (self.system_prompt if prompt.shared_system else None)
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": prompt.user}]

    @property
    def extra_users(self) -> int:
        """Users of fixed-size classes, who run beside the level's users."""
        return sum(c.users for c in self.classes if isinstance(c.users, int))

    def class_of_user(self, index: int) -> RequestClass | None:
        """The class user number `index` sends: fixed classes take the first users."""
        for request_class in self.classes:
            if isinstance(request_class.users, int):
                if index < request_class.users:
                    return request_class
                index -= request_class.users
        return next((c for c in self.classes if c.users == LEVEL), None)

    def prompt_for(self, request_class: RequestClass | None, number: int, salt: str) -> Prompt:
        """The prompt of logical request `number`: round-robin, or generated and unique."""
        if request_class is None:
            return self.prompts[number % len(self.prompts)]
        if request_class.prompt == "story":
            system, user = generate.story(self.seed, salt, number)
        else:
            assert request_class.prompt_tokens is not None  # checked on creation
            system, user = generate.document(self.seed, salt, number, request_class.prompt_tokens)
        return Prompt(f"{request_class.name}-{salt}-{number}", user, False, system)


def resolve_workload(name_or_path: str) -> Path:
    """A file, or a short name: default (workload.json), grounded, decode, long, mixed."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return path
    stem = "workload" if name_or_path == "default" else f"workload_{name_or_path}"
    named = BENCH_DIR / f"{stem}.json"
    if not named.exists():
        known = ", ".join(sorted(workload_name(p) for p in BENCH_DIR.glob("workload*.json")))
        raise ValueError(f"no workload {name_or_path!r}: a .json file or one of {known}")
    return named


def workload_name(path: Path | str) -> str:
    """The short name of a workload file: workload.json is 'default', workload_X.json is X."""
    stem = Path(path).stem
    return "default" if stem == "workload" else stem.removeprefix("workload_")


def load_workload(path: Path = DEFAULT_WORKLOAD) -> Workload:
    raw = path.read_bytes()
    data = json.loads(raw)
    return Workload(
        version=int(data["version"]),
        system_prompt=data.get("system_prompt", ""),
        prompts=tuple(_prompt(p) for p in data.get("prompts", [])),
        check_prompts=tuple(_prompt(p) for p in data["check_prompts"]),
        check_max_tokens=int(data["check_max_tokens"]),
        sha256=hashlib.sha256(raw).hexdigest(),
        name=workload_name(path),
        seed=int(data.get("seed", 0)),
        classes=tuple(_class(c) for c in data.get("classes", [])),
    )


def _prompt(item: dict) -> Prompt:
    return Prompt(item["id"], item["user"], bool(item.get("shared_system", False)))


def _class(item: dict) -> RequestClass:
    tokens = item.get("prompt_tokens")
    return RequestClass(
        name=item["name"],
        users=item["users"],
        prompt=item["prompt"],
        max_tokens=item.get("max_tokens"),
        prompt_tokens=(int(tokens[0]), int(tokens[1])) if tokens else None,
    )


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
