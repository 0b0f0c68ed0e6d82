"""Prompts made from a seed, for the workloads that must never repeat one (bench/workload_*.json
with "classes"): a repeated prompt is answered partly from the prefix cache, which is not what
a decode-bound or long-prompt workload measures.

The same (seed, salt, request number) always gives the same prompt, so a run can be repeated and
its prompts rebuilt; a different salt (the harness uses the level) gives different ones.
Each prompt opens with its own tag in the system message, so no two share even one 16-token KV
block or one 64-character block of step 9's router record: the chat template's own opening is
all they have in common.

Documents are built from words that are one token each after a space in SmolLM2's tokenizer
(tests/test_bench_workloads.py checks every word), so a document's length in tokens is known
without a tokenizer: one per word, one per full stop.
"""

from __future__ import annotations

import random


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NOUNS = _words(
    "river city garden market village forest island harbor bridge tower castle school library "
    "station museum kitchen mountain valley desert ocean lake farm field road street house "
    "window door table chair letter story journey king queen doctor teacher farmer sailor "
    "soldier writer painter child friend family engineer merchant captain student worker "
    "council company report plan map machine engine clock lamp book paper song voice question "
    "answer problem reason season winter summer morning evening night storm rain wind snow "
    "fire water stone gold silver iron wood glass bread cheese apple horse dog bird fish ship "
    "train car boat"
)
ADJECTIVES = _words(
    "old young quiet busy small large bright dark cold warm early late strange simple careful "
    "brave gentle proud clever honest hidden famous empty crowded distant ancient modern heavy "
    "narrow wide sudden rare common public private local foreign northern southern eastern "
    "western golden silent patient curious"
)
VERBS = _words(
    "found built carried opened closed painted watched followed visited crossed studied counted "
    "repaired measured described noticed remembered collected answered explained covered "
    "protected delivered prepared ordered discovered planted cleaned moved changed checked "
    "reached"
)
PREPOSITIONS = _words("near behind beside under above across through beyond around inside")
SENTENCE_TOKENS = 11  # "The ADJ NOUN VERB the ADJ NOUN PREP the NOUN." : ten words, a stop
# A document prompt's tokens besides the document (chat template, system, tag, question): 47
# with a short tag, a few more with a long one.
DOCUMENT_OVERHEAD = 50

STORY_SYSTEM = "You are a storyteller who writes long, detailed stories."
STORY_USER = (
    "Write a long story about {a_adj} {noun} who {verb} a {noun2} {prep} the {place}. "
    "Describe every scene and every character in detail."
)
DOCUMENT_SYSTEM = "You read documents and answer questions about them briefly."
DOCUMENT_USER = "Read this report, then say in one word what it is mostly about.\n\n{document}"


def rng(seed: int, salt: str, number: int) -> random.Random:
    """A generator of its own per prompt: a string seed is hashed the same way in every run."""
    return random.Random(f"{seed}:{salt}:{number}")


def tag(salt: str, number: int) -> str:
    return f"Request {salt}-{number}."


def story(seed: int, salt: str, number: int) -> tuple[str, str]:
    """(system, user) asking for a long story: the answer runs to max_tokens, not to a stop."""
    r = rng(seed, salt, number)
    user = STORY_USER.format(
        a_adj=_with_article(r.choice(ADJECTIVES)),
        noun=r.choice(NOUNS),
        verb=r.choice(VERBS),
        noun2=r.choice(NOUNS),
        prep=r.choice(PREPOSITIONS),
        place=r.choice(NOUNS),
    )
    return f"{tag(salt, number)} {STORY_SYSTEM}", user


def document(seed: int, salt: str, number: int, tokens: tuple[int, int]) -> tuple[str, str]:
    """(system, user) holding a document sized so the whole prompt lands inside `tokens`.

    The length is drawn uniformly, a sentence short of either end, since a sentence is the step
    and the tag's length varies by a few tokens.
    """
    r = rng(seed, salt, number)
    low = tokens[0] - DOCUMENT_OVERHEAD + SENTENCE_TOKENS
    high = tokens[1] - DOCUMENT_OVERHEAD - SENTENCE_TOKENS
    sentences = r.randint(low, high) // SENTENCE_TOKENS
    text = " ".join(_sentence(r) for _ in range(sentences))
    return f"{tag(salt, number)} {DOCUMENT_SYSTEM}", DOCUMENT_USER.format(document=text)


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(r: random.Random) -> str:
    words = (
        "The", r.choice(ADJECTIVES), r.choice(NOUNS), r.choice(VERBS), "the",
        r.choice(ADJECTIVES), r.choice(NOUNS), r.choice(PREPOSITIONS), "the", r.choice(NOUNS),
    )  # fmt: skip
    return " ".join(words) + "."
