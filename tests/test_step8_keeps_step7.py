"""Step 7's engine tests, run again with step 8's engine in step 7's place.

Every test below is step 7's own (imported, not copied), and every name they build an engine
with is swapped for step 8's: `PagedEngine` -> `SpeculativeEngine`, `EngineConfig` ->
`SpeculativeConfig`. So that speculation really runs in each of them, and not only where the
text happens to repeat, the proposer always proposes: prompt lookup's draft where it has one,
else the last token repeated (mostly wrong: rejections and rollbacks in every test), and rows
cost nothing, so every sequence drafts at every decode step whatever its acceptance. Step 7's
assertions must hold as they are: greedy tokens equal transformers', the pool drains to empty,
preemption, cancellation, prefix caching, n > 1 and fault isolation work. One is left out:
`test_n_choices_share_the_prompts_blocks_and_compute_it_once` counts the rows computed, and
step 8 computes draft rows too (its own n > 1 test is in test_step8_speculative.py).

The fixture checks, after each test, that the engines it built were step 8's and verified
drafts. The server tests run over step 8 in test_contract.py, test_cancellation.py and
test_step8_speculative.py.
"""

from __future__ import annotations

import pytest

import step8_speculative.engine as step8_engine
import tests.test_step7_edges as edges
import tests.test_step7_paged_engine as paged
from step8_speculative.draft_policy import RowCosts
from step8_speculative.engine import SpeculativeConfig, SpeculativeEngine
from step8_speculative.proposer import PromptLookup
from tests.test_step7_edges import (  # noqa: F401 (collected here, with the fixture below)
    test_a_cancelled_choice_leaves_the_others_running,
    test_a_cancelled_request_stops_counting_at_once_and_the_engine_records_it,
    test_a_choice_whose_sampling_fails_fails_alone,
    test_a_prefix_computed_twice_keeps_one_record_of_each_blocks_name,
    test_prefix_cache_counters_do_not_move_while_a_blocked_request_waits,
    test_the_scheduler_owns_the_deadline_of_a_waiting_request,
    tiny_lm,
)
from tests.test_step7_paged_engine import (  # noqa: F401
    test_a_fault_in_one_sequence_fails_that_sequence_alone,
    test_a_fault_while_sampling_fails_that_iteration_not_the_engine,
    test_a_preempted_sequence_waits_again_and_admission_counts_it,
    test_cancelled_sequence_frees_its_blocks_at_once,
    test_chunked_prefill_mixed_with_decodes,
    test_filling_the_pool_and_draining_it_frees_every_block,
    test_mixed_batch_matches_each_alone,
    test_preempted_sequences_resume_without_repeating_tokens,
    test_prefix_cache_hit_reuses_blocks_and_keeps_tokens,
    test_prompts_ending_at_and_across_block_boundaries,
    test_request_larger_than_the_pool_is_refused,
    test_single_prompts_match_generate,
)

# Step 7's tests in which step 8's engine has no draft to verify, and why.
NOTHING_TO_VERIFY = {
    "test_request_larger_than_the_pool_is_refused": "no iteration runs",
    "test_a_cancelled_request_stops_counting_at_once_and_the_engine_records_it": (
        "cancelled before its first decode"
    ),
    "test_a_preempted_sequence_waits_again_and_admission_counts_it": (
        "12 blocks: the pool is too tight to draft until the first preemption, where it stops"
    ),
}


@pytest.fixture(autouse=True)
def speculating(monkeypatch, request):
    """Swap the engine, and after the test prove the swap took: every engine it built was
    step 8's, and (where anything decoded) they verified drafts."""
    lookup = PromptLookup.propose
    engines: list[SpeculativeEngine] = []

    def always(self, tokens: list[int], k: int | None = None) -> list[int]:
        return lookup(self, tokens, k) or [tokens[-1]] * (self.k if k is None else k)

    class Recorded(SpeculativeEngine):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            engines.append(self)

    monkeypatch.setattr(PromptLookup, "propose", always)
    free_rows = lambda *args, **kwargs: RowCosts({1: 1.0})  # noqa: E731 (any draft pays)
    monkeypatch.setattr(step8_engine, "measure_row_costs", free_rows)
    for module in (paged, edges):
        monkeypatch.setattr(module, "PagedEngine", Recorded)
        monkeypatch.setattr(module, "EngineConfig", SpeculativeConfig)
    yield
    assert engines, "no engine was built through the swapped names"
    if request.node.originalname not in NOTHING_TO_VERIFY:
        assert sum(e.stats.verifications for e in engines) > 0, "no draft was verified"
