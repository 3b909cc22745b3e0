"""Fair batch formation between requests (issue 22): a small request is not queued
behind a giant one.

The queueing rule is request_queue.py's (least served first, in tokens); these
tests check it as a data structure (no asyncio) and through the batcher on the
fake engine (one character is one token). Every check is logical (which batch a
pair went into, counted in the fake engine's record), not a wall-clock window.
The batcher tests failed before the fair queue: one FIFO queue for all requests
put the small request's pairs after all of the giant one's (batch ~32 of 33).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import pytest

from pairscore.types import Pair, ScoreOptions
from pairscore_server.batcher import Batcher, group_key
from pairscore_server.request_queue import FairQueue

from harness.fake_engine import FakeEngine, expected_score

T = TypeVar("T")


# --- the queue alone -------------------------------------------------------------------


@dataclass(eq=False)
class Item:
    name: str
    tokens: int = 10
    key: tuple[int, ...] | None = None


def drain(queue: FairQueue[str, Item], *, keys: frozenset[tuple[int, ...]] = frozenset()) -> list[str]:
    out = []
    while (pick := queue.peek(keys)) is not None:
        out.append(queue.take(pick).name)
    return out


def test_one_request_is_taken_in_its_own_order() -> None:
    queue: FairQueue[str, Item] = FairQueue()
    queue.add("a", [Item(f"a{i}") for i in range(5)])
    assert (queue.pairs, queue.tokens) == (5, 50)
    assert drain(queue) == ["a0", "a1", "a2", "a3", "a4"]
    assert (queue.pairs, queue.tokens, bool(queue)) == (0, 0, False)


def test_a_late_request_takes_turns_with_one_queued_long_before_it() -> None:
    queue: FairQueue[str, Item] = FairQueue()
    queue.add("giant", [Item(f"g{i}") for i in range(1000)])
    for _ in range(500):  # half of the giant is taken before the small one comes
        queue.take(queue.peek(frozenset()))  # type: ignore[arg-type]
    queue.add("small", [Item(f"s{i}") for i in range(3)])
    # Joined at the giant's level: turns from now on, no debt for the 500 taken before.
    assert drain(queue)[:7] == ["g500", "s0", "g501", "s1", "g502", "s2", "g503"]


def test_turns_are_in_tokens_not_pairs() -> None:
    queue: FairQueue[str, Item] = FairQueue()
    queue.add("long", [Item(f"L{i}", tokens=30) for i in range(4)])
    queue.add("short", [Item(f"s{i}", tokens=10) for i in range(9)])
    # Each long pair is three short ones' work: the short request gets three pairs a turn.
    assert drain(queue) == [
        "L0", "s0", "s1", "s2", "L1", "s3", "s4", "s5", "L2", "s6", "s7", "s8", "L3",
    ]  # fmt: skip


def test_the_bound_holds_for_any_number_of_large_requests() -> None:
    """B (W tokens) joining N queued requests is served within (N + 1) W + N M tokens."""
    queue: FairQueue[str, Item] = FairQueue()
    sizes = [7, 13, 29, 3, 50]
    for n, size in enumerate(sizes):
        queue.add(f"big{n}", [Item(f"big{n}-{i}", tokens=size) for i in range(200)])
    for _ in range(321):  # somewhere in the middle of their turns
        queue.take(queue.peek(frozenset()))  # type: ignore[arg-type]
    queue.add("B", [Item(f"B{i}", tokens=5) for i in range(4)])
    work = 0
    while True:
        pick = queue.peek(frozenset())
        assert pick is not None
        item = queue.take(pick)
        work += item.tokens
        if item.name == "B3":
            break
    n, w, m = len(sizes), 4 * 5, max(sizes)
    assert work <= (n + 1) * w + n * m


def test_ahead_of_bounds_the_work_served_before_a_new_request() -> None:
    queue: FairQueue[str, Item] = FairQueue()
    queue.add("giant", [Item(f"g{i}", tokens=10 + i % 3) for i in range(1000)])  # largest 12
    queue.add("little", [Item("l0", tokens=4)])
    ahead = queue.ahead_of(30)
    assert ahead == (30 + 12) + 4  # the giant's W + M, and all of the little one
    queue.add("B", [Item(f"B{i}", tokens=10) for i in range(3)])
    others = 0  # tokens of other requests taken before B's last pair
    while (pick := queue.peek(frozenset())) is not None:
        item = queue.take(pick)
        if item.name == "B2":
            break
        others += 0 if pick.owner == "B" else item.tokens
    assert 0 < others <= ahead  # what admission counted ahead of B was enough


def test_grouping_picks_a_mate_within_the_request_and_between_tied_requests() -> None:
    k, other = (1, 2), (3, 4)
    queue: FairQueue[str, Item] = FairQueue()
    queue.add("one", [Item("o-other", key=other), Item("o-k", key=k)])
    # Within a request: its pair sharing the batch's key comes first.
    pick = queue.peek(frozenset({k}))
    assert pick is not None and pick.item.name == "o-k"
    # Between requests tied at one level (three one-pair requests queued together):
    queue2: FairQueue[str, Item] = FairQueue()
    for name, key in [("a", k), ("x", other), ("b", k)]:
        queue2.add(name, [Item(name, key=key)])
    first = queue2.take(queue2.peek(frozenset()))  # type: ignore[arg-type]
    assert first.name == "a"
    assert drain(queue2, keys=frozenset({k})) == ["b", "x"]


def test_discard_removes_a_request_and_a_stale_pick_is_refused() -> None:
    queue: FairQueue[str, Item] = FairQueue()
    queue.add("a", [Item("a0"), Item("a1", tokens=5)])
    queue.add("b", [Item("b0")])
    pick = queue.peek(frozenset())
    assert pick is not None and pick.owner == "a"
    assert queue.discard("a") == (2, 15)
    assert queue.discard("a") == (0, 0)
    with pytest.raises(ValueError, match="changed"):
        queue.take(pick)
    assert queue.owners() == ["b"] and "a" not in queue
    assert drain(queue) == ["b0"]
    queue.add("c", [Item("c0")])
    with pytest.raises(ValueError, match="already"):
        queue.add("c", [Item("c1")])


# --- through the batcher ---------------------------------------------------------------


def run(make: Callable[[], Awaitable[T]], *, timeout: float = 60.0) -> T:
    async def guarded() -> T:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(guarded())


def batches_with(engine: FakeEngine, prefix: str) -> list[int]:
    """Indexes of the engine's batches that hold a prompt starting with ``prefix``."""
    return [i for i, batch in enumerate(engine.batches) if any(p.startswith(prefix) for p in batch)]


def test_a_small_request_goes_into_the_next_batch_behind_a_giant_one() -> None:
    """A has 2,000 pairs queued when B comes with 3: B's pairs are in the next batch
    formed after it arrives (one more if one was being handed to the model just then),
    not after A's last pair (batch 32 of 32, before)."""

    async def body() -> None:
        engine = FakeEngine(forward_delay_s=0.02)
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(engine, executor, max_batch_pairs=64, max_wait_s=0.0)
        batcher.start()
        try:
            giant = [Pair(f"giant {i:04d}", " y", id=str(i)) for i in range(2000)]
            big = asyncio.ensure_future(batcher.submit(engine.prepare(giant, ScoreOptions())))
            while not engine.batches:  # A's first batch is in the model
                await asyncio.sleep(0.005)
            started = len(engine.batches)
            small = [Pair(f"small {i}", " y", id=f"s{i}") for i in range(3)]
            assert await batcher.submit(engine.prepare(small, ScoreOptions())) == [
                expected_score(p) for p in small
            ]
            assert batches_with(engine, "small")[-1] <= started  # index `started`: the next batch
            assert batcher.queued_pairs > 1000  # A is far from done
            assert await big == [expected_score(p) for p in giant]
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)
        scored = [p for batch in engine.batches for p in batch]
        assert sorted(scored) == sorted(p.prompt for p in giant + small)  # each pair once
        assert all(len(batch) <= 64 for batch in engine.batches)

    run(body)


def test_two_giant_requests_share_every_batch() -> None:
    async def body() -> None:
        engine = FakeEngine(forward_delay_s=0.0)
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(engine, executor, max_batch_pairs=32, max_wait_s=0.0)
        batcher.start()
        try:
            a = [Pair(f"a {i:04d}", " y") for i in range(640)]
            c = [Pair(f"c {i:04d}", " y") for i in range(640)]
            await asyncio.gather(*(batcher.submit(engine.prepare(r, ScoreOptions())) for r in (a, c)))
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)
        for batch in engine.batches:  # same-sized pairs: half each
            assert sum(p.startswith("a") for p in batch) == sum(p.startswith("c") for p in batch)

    run(body)


@pytest.mark.parametrize("with_small", [False, True], ids=["alone", "with-a-small-request"])
def test_grouping_stays_as_good_for_one_big_request_of_shared_prompts(with_small: bool) -> None:
    """One request of 512 pairs from 4 few-shot templates, interleaved, batches of 32:
    alone, every batch holds one template (each shared run is computed once per batch),
    as before the fair queue. A small unrelated request arriving in the middle takes its
    turn and costs at most one batch holding two templates."""
    templates = [f"Template {t}: you are a careful assistant; answer briefly.\n" for t in range(4)]
    pairs = [Pair(templates[i % 4] + f"Q{i}?", " y") for i in range(512)]
    small = [Pair(f"small {i}", " y") for i in range(3)]

    async def body() -> None:
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(engine, executor, max_batch_pairs=32, max_wait_s=0.0)
        batcher.start()
        try:
            big = asyncio.ensure_future(batcher.submit(engine.prepare(pairs, ScoreOptions())))
            if with_small:
                while len(engine.batches) < 3:
                    await asyncio.sleep(0.005)
                await batcher.submit(engine.prepare(small, ScoreOptions()))
            await big
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)

    engine = FakeEngine(forward_delay_s=0.005, max_context=128)
    run(body)
    key_of = {
        p.prompt: group_key(q) for p, q in zip(pairs, engine.prepare(pairs, ScoreOptions()), strict=True)
    }
    templates_per_batch = [len({key_of[p] for p in batch if p in key_of}) for batch in engine.batches]
    assert sum(len(b) for b in engine.batches) == 512 + 3 * with_small
    if with_small:
        assert sum(templates_per_batch) <= 16 + 1
        assert batches_with(engine, "small")[0] <= 4  # it did not wait for the big one
    else:
        assert templates_per_batch == [1] * 16


def test_admission_counts_only_the_work_the_fair_queue_serves_first() -> None:
    """A small request with a deadline that the giant request's whole queue would miss,
    but its fair share meets, is admitted and answered in time (before, admission
    assumed first come, first served and refused it: DeadlineUnmeetableError)."""

    async def body() -> None:
        engine = FakeEngine(forward_delay_s=0.05)
        executor = ThreadPoolExecutor(1)
        batcher = Batcher(engine, executor, max_batch_pairs=64, max_wait_s=0.0)
        batcher.start()
        try:
            giant = [Pair(f"giant {i:04d}", " y") for i in range(4000)]
            big = asyncio.ensure_future(batcher.submit(engine.prepare(giant, ScoreOptions())))
            while len(engine.batches) < 3:  # the throughput is measured
                await asyncio.sleep(0.005)
            assert batcher.retry_after_s() > 1.5  # the whole queue, at the measured rate
            small = [Pair(f"small {i}", " y") for i in range(3)]
            deadline = time.monotonic() + 1.0
            result = await batcher.submit(engine.prepare(small, ScoreOptions()), deadline=deadline)
            assert result == [expected_score(p) for p in small]
            big.cancel()
        finally:
            await batcher.stop()
            executor.shutdown(wait=True)

    run(body)
