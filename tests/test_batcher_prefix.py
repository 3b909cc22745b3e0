"""The batcher groups queued pairs that begin with the same run of token ids (issue 15).

Against the fake engine (one character is one token, prefix id 0): a pair whose
prompt has at least GROUP_PREFIX_TOKENS - 1 characters is grouped by its first
GROUP_PREFIX_TOKENS ids.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pairscore.types import Pair, ScoreOptions
from pairscore_server.batcher import GROUP_PREFIX_TOKENS, Batcher, group_key

from harness.fake_engine import FakeEngine, expected_score

PREAMBLE = "You are a careful assistant. Answer briefly.\n"  # longer than GROUP_PREFIX_TOKENS
assert len(PREAMBLE) >= GROUP_PREFIX_TOKENS


async def score_all(engine: FakeEngine, requests: list[list[Pair]], **batcher) -> list[list]:
    """Submit every request in one event-loop tick (so all are queued before the first
    batch is collected) and wait for all their results."""
    executor = ThreadPoolExecutor(1)
    b = Batcher(engine, executor, **batcher)
    b.start()
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(b.submit(engine.prepare(r, ScoreOptions())) for r in requests)), 15
        )
    finally:
        await b.stop()
        executor.shutdown(wait=True)


def test_pairs_sharing_a_prefix_from_different_requests_share_a_batch():
    """Requests of one pair each, all queued at once, are tied in the fair queue
    (request_queue.py): arrival order would put the two few-shot pairs in different
    batches; grouping pulls the second one ahead of the unrelated request, which then
    gets the next batch."""
    shared_a = [Pair(PREAMBLE + "Question 0?", " 0", id="a")]
    other = [[Pair(f"An unrelated prompt number {i}, long enough", " y", id=f"o{i}")] for i in range(2)]
    shared_b = [Pair(PREAMBLE + "Question 1?", " 1", id="b")]
    engine = FakeEngine(max_context=128)
    requests = [shared_a, other[0], shared_b, other[1]]
    results = asyncio.run(score_all(engine, requests, max_batch_pairs=2, max_wait_s=0.2))
    for request, got in zip(requests, results, strict=True):
        assert got == [expected_score(p) for p in request]
    assert engine.batches == [
        tuple(p.prompt for p in shared_a + shared_b),
        tuple(r[0].prompt for r in other),
    ]


def test_fair_shares_come_before_grouping_between_requests():
    """Requests of several pairs each get their fair share of every batch (the unrelated
    request is not pushed back behind the few-shot ones); within that share, the
    few-shot requests' pairs are still taken together."""
    shared_a = [Pair(PREAMBLE + f"Question {i}?", f" {i}", id=f"a{i}") for i in range(2)]
    other = [Pair(f"An unrelated prompt number {i}, long enough", " y", id=f"o{i}") for i in range(3)]
    shared_b = [Pair(PREAMBLE + f"Question {i}?", f" {i}!", id=f"b{i}") for i in range(2, 4)]
    engine = FakeEngine(max_context=128)
    requests = [shared_a, other, shared_b]
    results = asyncio.run(score_all(engine, requests, max_batch_pairs=4, max_wait_s=0.2))
    for request, got in zip(requests, results, strict=True):
        assert got == [expected_score(p) for p in request]
    # a0 (oldest), b2 (tied with the unrelated request at nothing served, and sharing a0's
    # prefix), then the unrelated request, least served (its pairs are shorter), twice.
    first = [shared_a[0], shared_b[0], other[0], other[1]]
    assert engine.batches == [
        tuple(p.prompt for p in first),
        tuple(p.prompt for p in (shared_a[1], shared_b[1], other[2])),
    ]


def test_a_shared_preamble_counts_once_in_the_call_budget():
    """The batch budget counts the positions the engine computes (engine/tries.py
    CallSize): 30 few-shot pairs of ~60 tokens, ~5 of them their own, fit one 400-token
    call; sized as pairs x longest pair (the old rule) they took six calls, each
    computing the shared preamble again."""
    pairs = [Pair(PREAMBLE + f"Question {i}?", f" {i}", id=f"q{i}") for i in range(30)]
    sharing = FakeEngine(max_context=128, max_batch_tokens=400, shares_runs=True)
    [got] = asyncio.run(score_all(sharing, [pairs], max_batch_pairs=64, max_wait_s=0.2))
    assert got == [expected_score(p) for p in pairs]
    assert len(sharing.batches) == 1
    plain = FakeEngine(max_context=128, max_batch_tokens=400)  # nothing shared: every token counts
    asyncio.run(score_all(plain, [pairs], max_batch_pairs=64, max_wait_s=0.2))
    assert len(plain.batches) == 5  # 30 pairs x ~60 tokens, <= 400 a call
    assert all(sum(lengths) <= 400 for lengths in plain.batch_lengths)


def test_pairs_without_a_long_prompt_keep_arrival_order():
    """A prompt shorter than the group key is never moved ahead: same prompts of a few
    tokens, interleaved, are taken in the order they came."""
    pairs = [Pair(f"q{i % 2}", f" {i}", id=str(i)) for i in range(6)]
    engine = FakeEngine()
    results = asyncio.run(score_all(engine, [[p] for p in pairs], max_batch_pairs=3, max_wait_s=0.2))
    assert [r[0] for r in results] == [expected_score(p) for p in pairs]
    assert [p for batch in engine.batches for p in batch] == [p.prompt for p in pairs]
    assert group_key(engine.prepare([pairs[0]], ScoreOptions())[0]) is None


def test_group_key_is_the_first_ids_of_a_long_prompt():
    engine = FakeEngine(max_context=128)
    a, b, c = engine.prepare(
        [Pair(PREAMBLE + "x", " y"), Pair(PREAMBLE + "other", ""), Pair("", PREAMBLE)], ScoreOptions()
    )
    assert group_key(a) == group_key(b) == a.input_ids[:GROUP_PREFIX_TOKENS]
    assert group_key(c) is None  # the run is in the response: not grouped
