"""Which replica gets a request: the lesson of step 9, as pure functions over plain data.

- `round_robin`: the next replica in turn. Even, and blind to load and to caches.
- `least_loaded`: the power of two choices: two replicas drawn at random, the one with fewer
  outstanding requests wins. Balances queues, still blind to caches.
- `cache_aware` (the default): the router keeps an approximate record per replica of the prompt
  prefixes it sent there. A prompt is cut into blocks of characters, each named by a hash of
  itself and of the name before it (common.prefix chains token blocks the same way), so a name
  stands for the whole prefix up to its block. The replica whose record holds the longest leading
  run of the prompt's names wins, if that run covers at least `match_threshold` of the prompt
  and the replica is not busier than the least loaded one by more than the imbalance guard
  allows; otherwise the least loaded replica gets it, and its record learns the prompt.

Nothing here does I/O. The functions take the candidates (replicas that are up and not resting
after a 429), their loads and records, and return a Decision; `Router` only keeps the state
between calls (whose turn it is, the records, the random draws) and feeds them in.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.config import ConfigPart, knob
from common.protocol import ChatCompletionRequest, GenerationRequest

POLICIES = ("round_robin", "least_loaded", "cache_aware")


@dataclass(frozen=True)
class RoutingConfig(ConfigPart):
    policy: str = knob("cache_aware", "round_robin | least_loaded | cache_aware")
    prefix_block_chars: int = knob(
        64, "characters per block of the prefix record (about one 16-token KV block of text)"
    )
    prefix_record_blocks: int = knob(
        2048, "block names remembered per replica; the least recently used are forgotten first"
    )
    match_threshold: float = knob(
        0.5, "cache_aware: share of a prompt's blocks a replica must hold to be preferred"
    )
    imbalance_abs: int = knob(
        8, "cache_aware: the preferred replica may run this many more requests than the idlest"
    )
    imbalance_rel: float = knob(
        1.5, "... or this many times as many; past both, the least loaded replica gets it"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, not {self.policy!r}")
        if self.prefix_block_chars < 1 or self.prefix_record_blocks < 1:
            raise ValueError("prefix_block_chars and prefix_record_blocks must be at least 1")
        if not 0 < self.match_threshold <= 1:
            raise ValueError("match_threshold must be in (0, 1]")
        if self.imbalance_abs < 0 or self.imbalance_rel < 1:
            raise ValueError("imbalance_abs must be >= 0 and imbalance_rel >= 1")


@dataclass(frozen=True)
class Decision:
    upstream: str
    reason: str  # round_robin | least_loaded | prefix_match | no_match | imbalance
    matched_blocks: int = 0


# ---------------------------------------------------------------- the prefix record


def prompt_text(request: GenerationRequest) -> str:
    """What a replica will see first: the chat messages in order, each with its role, or the
    completion prompt (token ids written out as numbers)."""
    if isinstance(request, ChatCompletionRequest):
        messages = (m.as_dict() for m in request.messages)
        return "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
    prompt = getattr(request, "prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def prefix_blocks(text: str, block_chars: int) -> list[bytes]:
    """One chained name per block of `text`, the last (partial) block included: a prompt
    shorter than a block still has a name, so repeating it exactly can still be matched."""
    names, parent = [], b""
    for start in range(0, len(text), block_chars):
        digest = hashlib.blake2b(parent, digest_size=8)
        digest.update(text[start : start + block_chars].encode("utf-8", "surrogatepass"))
        parent = digest.digest()
        names.append(parent)
    return names


class PrefixRecord:
    """The block names one replica was sent, in least-recently-used order, at most `capacity`.
    Approximate on purpose: the replica's cache evicts by its own rules, unseen from here."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._names: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._names)

    def match(self, names: Sequence[bytes]) -> int:
        """How many leading names of the prompt this record holds."""
        count = 0
        for name in names:
            if name not in self._names:
                break
            count += 1
        return count

    def insert(self, names: Iterable[bytes]) -> None:
        """Remember a prompt's names as the most recently used, forgetting the oldest."""
        for name in names:
            self._names[name] = None
            self._names.move_to_end(name)
        while len(self._names) > self.capacity:
            self._names.popitem(last=False)


# ---------------------------------------------------------------- the policies


def round_robin(candidates: Sequence[str], turn: int) -> Decision:
    """The candidate at position `turn` (wrapping round)."""
    return Decision(candidates[turn % len(candidates)], "round_robin")


def least_loaded(
    candidates: Sequence[str], loads: Mapping[str, int], rng: random.Random
) -> Decision:
    """Power of two choices: the less loaded of two distinct random candidates (the first
    drawn on a tie). With two candidates that is simply the less loaded one."""
    pair = rng.sample(list(candidates), k=min(2, len(candidates)))
    return Decision(min(pair, key=lambda name: loads.get(name, 0)), "least_loaded")


def imbalanced(load: int, least: int, config: RoutingConfig) -> bool:
    """The guard: sending one more request to a replica running `load` would unbalance the
    fleet too much when it is ahead of the idlest (`least`) both absolutely and relatively."""
    return load - least > config.imbalance_abs and load > least * config.imbalance_rel


def cache_aware(
    names: Sequence[bytes],
    candidates: Sequence[str],
    loads: Mapping[str, int],
    records: Mapping[str, PrefixRecord],
    config: RoutingConfig,
    rng: random.Random,
) -> Decision:
    """The longest match over the threshold, unless the guard says no; else the least loaded.
    Among equally long matches, the less loaded replica wins."""
    fallback = least_loaded(candidates, loads, rng)
    matches = {name: records[name].match(names) if name in records else 0 for name in candidates}
    best = max(candidates, key=lambda name: (matches[name], -loads.get(name, 0)))
    matched = matches[best]
    if not names or matched < config.match_threshold * len(names):
        return Decision(fallback.upstream, "no_match", matched)
    least = min(loads.get(name, 0) for name in candidates)
    if imbalanced(loads.get(best, 0), least, config):
        return Decision(fallback.upstream, "imbalance", matched)
    return Decision(best, "prefix_match", matched)


# ---------------------------------------------------------------- the state between calls


class Router:
    """Applies the configured policy; owns the turn counter, the records and the random draws."""

    def __init__(self, config: RoutingConfig, seed: int | None = None) -> None:
        self.config = config
        self.records: dict[str, PrefixRecord] = {}
        self.turn = 0
        self.rng = random.Random(seed)

    def names(self, prompt: str) -> list[bytes]:
        if self.config.policy != "cache_aware":
            return []  # the other policies never look at the prompt
        return prefix_blocks(prompt, self.config.prefix_block_chars)

    def choose(
        self, candidates: Sequence[str], loads: Mapping[str, int], names: Sequence[bytes]
    ) -> Decision:
        """A replica for a prompt with these block names; `candidates` must not be empty."""
        if not candidates:
            raise ValueError("no candidate replica")
        policy = self.config.policy
        if policy == "round_robin":
            self.turn += 1
            return round_robin(candidates, self.turn - 1)
        if policy == "least_loaded":
            return least_loaded(candidates, loads, self.rng)
        decision = cache_aware(names, candidates, loads, self.records, self.config, self.rng)
        self.remember(decision.upstream, names)
        return decision

    def remember(self, upstream: str, names: Sequence[bytes]) -> None:
        record = self.records.get(upstream)
        if record is None:
            record = self.records[upstream] = PrefixRecord(self.config.prefix_record_blocks)
        record.insert(names)

    def forget(self, upstream: str) -> None:
        """A replica that went away may come back with an empty cache: start its record anew."""
        self.records.pop(upstream, None)
