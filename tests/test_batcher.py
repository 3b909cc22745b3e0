"""The dynamic batcher, against the fake engine (no model, no gRPC)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from pairscore.types import ItemError, ItemErrorCode, Pair, ScoreOptions
from pairscore_server.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFailedError,
    DeadlineExceededError,
    QueueFullError,
    RequestLimitError,
    WorkerUnavailableError,
)
from pairscore_server.engine.memory import is_out_of_memory
from pairscore_server.metrics import Metrics

from harness.fake_engine import FakeEngine, cuda_oom, expected_score

T = TypeVar("T")
MODEL_THREAD = "test-model"


def run(make: Callable[[], Awaitable[T]], *, timeout: float = 15.0) -> T:
    """Run one async test body in a fresh event loop, with a safety timeout."""

    async def guarded() -> T:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(guarded())


class Harness:
    """A started batcher on a fake engine, with its executor and metrics."""

    def __init__(
        self,
        engine: FakeEngine,
        *,
        max_batch_pairs: int = 64,
        max_wait_s: float = 0.0,
        max_queue_tokens: int | None = None,
    ):
        self.engine = engine
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=MODEL_THREAD)
        self.batcher = Batcher(
            engine,
            self.executor,
            max_batch_pairs=max_batch_pairs,
            max_wait_s=max_wait_s,
            max_queue_tokens=max_queue_tokens,
            metrics=self.metrics,
        )

    async def __aenter__(self) -> Harness:
        self.batcher.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.batcher.stop()
        self.executor.shutdown(wait=True)

    async def score(self, *pairs: Pair, deadline: float | None = None) -> list:
        prepared = self.engine.prepare(pairs, ScoreOptions())
        return await self.batcher.submit(prepared, deadline=deadline)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value


def pair(prompt: str, response: str = "!") -> Pair:
    return Pair(prompt=prompt, response=response, id=prompt)


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for a state of the batcher (an event, not a time: the run() timeout guards it)."""
    while not predicate():
        await asyncio.sleep(0.001)


class LoopLag:
    """How late the event loop runs under the machine's present load: the worst delay of a
    10 ms sleep's wake-up while the block runs. A wall-clock upper bound adds a multiple
    of it, so a loaded machine stretches the bound instead of failing the test."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - asked - 0.01)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.ensure_future(self._probe())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def test_concurrent_requests_share_a_batch_and_results_keep_their_order() -> None:
    async def body() -> None:
        async with Harness(FakeEngine(), max_wait_s=0.2) as h:
            requests = [[pair(f"r{r}p{i}" + "x" * i) for i in range(3)] for r in range(4)]
            results = await asyncio.gather(*(h.score(*req) for req in requests))
            for req, res in zip(requests, results, strict=True):
                assert res == [expected_score(p) for p in req]
            assert len(h.engine.batches) == 1  # all 12 pairs arrived within max_wait
            assert len(h.engine.batches[0]) == 12

    run(body)


def test_batches_stay_under_the_token_budget_and_pair_limit() -> None:
    async def body() -> None:
        engine = FakeEngine(max_batch_tokens=40, max_context=64)
        async with Harness(engine, max_batch_pairs=5, max_wait_s=0.05) as h:
            pairs = [pair("p" * (i % 7) + str(i), "r" * (i % 5)) for i in range(40)]
            results = await asyncio.gather(*(h.score(p) for p in pairs))
            assert [r[0] for r in results] == [expected_score(p) for p in pairs]
        assert sum(len(b) for b in engine.batch_lengths) == 40
        for lengths in engine.batch_lengths:
            assert len(lengths) <= 5
            assert sum(lengths) <= 40 or len(lengths) == 1  # the fake engine shares no run
        assert len(engine.batch_lengths) >= 8  # 40 pairs, at most 5 per batch
        # Taken in arrival order: each batch continues where the previous one stopped.
        seen = [prompt for batch in engine.batches for prompt in batch]
        assert seen == [p.prompt for p in pairs]

    run(body)


def test_a_pair_longer_than_the_budget_still_runs_alone() -> None:
    async def body() -> None:
        engine = FakeEngine(max_batch_tokens=8, max_context=64)
        async with Harness(engine, max_wait_s=0.05) as h:
            long, short = pair("a" * 20), pair("b")
            results = await asyncio.gather(h.score(long), h.score(short))
            assert results == [[expected_score(long)], [expected_score(short)]]
        assert engine.batches == [("a" * 20,), ("b",)]

    run(body)


def test_max_wait_bounds_how_long_a_lone_pair_waits_for_company() -> None:
    max_wait = 0.5

    async def body() -> None:
        async with Harness(FakeEngine(), max_wait_s=max_wait) as h:
            started = time.monotonic()
            first = asyncio.ensure_future(h.score(pair("first")))
            await asyncio.sleep(0)  # "first" is queued
            await until(lambda: h.batcher.queued_pairs == 0)  # and taken into a batch
            second = await h.score(pair("second"))  # joins the batch the first one opened
            assert await first == [expected_score(pair("first"))]
            assert second == [expected_score(pair("second"))]
            assert time.monotonic() - started >= max_wait - 0.01  # it waited for company
            assert h.engine.batches == [("first", "second")]

            async with LoopLag() as lag:
                started = time.monotonic()
                await h.score(pair("alone"))  # nobody joins: dispatched once max_wait passes
                elapsed = time.monotonic() - started
            assert h.engine.batches[-1] == ("alone",)
            # Not before max_wait (timers may fire a clock tick early), and not much after:
            # the margin grows with the loop's measured lateness under the present load.
            assert max_wait - 0.01 <= elapsed < max_wait + 0.25 + 4 * lag.worst

    run(body)


def test_max_wait_zero_dispatches_at_once() -> None:
    """The first pair's batch is in the model before the next caller can join it: the
    batcher never waited for company (event order, not a time)."""

    async def body() -> None:
        engine = FakeEngine()
        async with Harness(engine, max_wait_s=0.0) as h:
            now = asyncio.ensure_future(h.score(pair("now")))
            await asyncio.sleep(0)  # "now" is queued
            await until(lambda: h.batcher.queued_pairs == 0)  # and taken into a batch
            later = await h.score(pair("later"))  # a batch still gathering would take it in
            assert await now == [expected_score(pair("now"))]
            assert later == [expected_score(pair("later"))]
        assert engine.batches == [("now",), ("later",)]

    run(body)


def test_failed_batch_fails_exactly_its_requests_and_the_loop_keeps_serving() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with Harness(engine, max_batch_pairs=2, max_wait_s=0.2) as h:
            names = ["ok1", "FAIL", "ok3", "ok4"]
            results = await asyncio.gather(*(h.score(pair(n)) for n in names), return_exceptions=True)
            assert engine.batches == [("ok1", "FAIL"), ("ok3", "ok4")]
            assert isinstance(results[0], BatchFailedError)  # shared the failing batch
            assert isinstance(results[1], BatchFailedError)
            assert "injected failure" in str(results[1])
            assert results[2] == [expected_score(pair("ok3"))]
            assert results[3] == [expected_score(pair("ok4"))]
            # The loop survived and serves the next request.
            assert await h.score(pair("after")) == [expected_score(pair("after"))]
            assert h.sample("pairscore_queue_pairs") == 0

    run(body)


def test_a_request_spanning_batches_fails_whole_and_its_rest_is_dropped() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with Harness(engine, max_batch_pairs=1) as h:
            with pytest.raises(BatchFailedError):
                await h.score(pair("FAIL"), pair("never1"), pair("never2"))
            assert h.batcher.queued_pairs == 0  # its two other pairs no longer count
            assert h.sample("pairscore_queue_pairs") == 0
            assert await h.score(pair("next")) == [expected_score(pair("next"))]
        assert engine.batches == [("FAIL",), ("next",)]

    run(body)


def test_cancelled_caller_is_skipped_and_does_not_poison_neighbours() -> None:
    async def body() -> None:
        gate = threading.Event()  # the model holds "busy" until the test opens it
        engine = FakeEngine(score_gate=gate)
        async with Harness(engine, max_batch_pairs=8) as h:
            busy = asyncio.ensure_future(h.score(pair("busy")))
            await until(lambda: h.batcher.busy_seconds > 0)  # "busy" is in the model
            doomed = asyncio.ensure_future(h.score(pair("doomed1"), pair("doomed2")))
            neighbour = asyncio.ensure_future(h.score(pair("neighbour")))
            await until(lambda: h.batcher.queued_pairs == 3)
            doomed.cancel()
            await asyncio.sleep(0)
            assert h.batcher.queued_pairs == 1
            assert h.sample("pairscore_queue_pairs") == 1
            gate.set()
            assert await busy == [expected_score(pair("busy"))]
            assert await neighbour == [expected_score(pair("neighbour"))]
            assert doomed.cancelled()
        assert engine.batches == [("busy",), ("neighbour",)]

    run(body)


def test_cancel_while_its_batch_runs_leaves_the_batch_mates_alone() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(score_gate=gate)
        async with Harness(engine, max_wait_s=0.05) as h:
            leaver = asyncio.ensure_future(h.score(pair("leaver")))
            stayer = asyncio.ensure_future(h.score(pair("stayer")))
            await until(lambda: h.batcher.busy_seconds > 0)  # both are in the running batch
            leaver.cancel()
            gate.set()
            assert await stayer == [expected_score(pair("stayer"))]
            assert leaver.cancelled()
        assert engine.batches == [("leaver", "stayer")]

    run(body)


def test_model_work_runs_off_the_event_loop_on_one_thread() -> None:
    async def body() -> None:
        gate = threading.Event()  # score() blocks its thread until the test opens it
        engine = FakeEngine(score_gate=gate)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        async with Harness(engine, max_batch_pairs=1) as h:
            tick_task = asyncio.ensure_future(ticker())
            scored = asyncio.gather(*(h.score(pair(f"p{i}")) for i in range(3)))
            await until(lambda: h.batcher.busy_seconds > 0)  # the engine is inside score()
            before = ticks
            await until(lambda: ticks >= before + 5)  # the loop ticks while the engine blocks
            gate.set()
            await scored
            tick_task.cancel()
        assert len(engine.score_threads) == 1
        (thread_name,) = engine.score_threads
        assert thread_name.startswith(MODEL_THREAD)
        assert thread_name != threading.main_thread().name

    run(body)


def test_stop_finishes_queued_work_then_refuses_new_work() -> None:
    async def body() -> None:
        engine = FakeEngine(forward_delay_s=0.05)
        h = Harness(engine, max_batch_pairs=2)
        await h.__aenter__()
        pending = [asyncio.ensure_future(h.score(pair(f"q{i}"))) for i in range(6)]
        await asyncio.sleep(0)
        await h.batcher.stop()
        assert [p.result() for p in pending] == [[expected_score(pair(f"q{i}"))] for i in range(6)]
        assert not h.batcher.running
        with pytest.raises(BatcherClosedError):
            await h.score(pair("late"))
        await h.__aexit__()

    run(body)


def test_batch_metrics_are_recorded() -> None:
    async def body() -> None:
        async with Harness(FakeEngine(), max_wait_s=0.1) as h:
            await asyncio.gather(h.score(pair("aaaa", "")), h.score(pair("b", "")))
            assert h.sample("pairscore_batch_pairs_count") == 1
            assert h.sample("pairscore_batch_pairs_sum") == 2
            # padded: longest (1 prefix + 4) x 2 pairs
            assert h.sample("pairscore_batch_tokens_sum") == 10
            assert h.sample("pairscore_forward_duration_seconds_count") == 1
            assert h.sample("pairscore_queue_pairs") == 0

    run(body)


# --- out of memory: split and retry -----------------------------------------------------


def test_oom_splits_the_batch_down_to_what_fits_and_counts_splits() -> None:
    async def body() -> None:
        # Pairs of 1 prefix + 3 prompt + 1 response = 5 tokens; 2 fit at once (10 <= 12).
        engine = FakeEngine(oom_above_tokens=12)
        async with Harness(engine, max_wait_s=0.1) as h:
            pairs = [pair(f"p{i:02d}") for i in range(8)]
            results = await asyncio.gather(*(h.score(p) for p in pairs))
            assert [r[0] for r in results] == [expected_score(p) for p in pairs]
            # 8 -> 4+4 -> 2+2+2+2: three levels, 1 + 2 = 3 failed calls split.
            assert len(engine.oom_batches) == 3
            assert h.sample("pairscore_oom_splits_total") == 3
            assert [len(b) for b in engine.batches] == [2, 2, 2, 2]
            assert [p for b in engine.batches for p in b] == [p.prompt for p in pairs]
            assert h.sample("pairscore_queue_pairs") == 0

    run(body)


def test_a_pair_that_does_not_fit_alone_fails_alone_with_resource_exhausted() -> None:
    async def body() -> None:
        engine = FakeEngine(oom_above_tokens=10)
        async with Harness(engine, max_wait_s=0.1) as h:
            small, huge, small2 = pair("ab"), pair("x" * 20), pair("cd")
            results = await asyncio.gather(h.score(small, huge), h.score(small2))
            assert results[1] == [expected_score(small2)]
            first, failed = results[0]
            assert first == expected_score(small)
            assert isinstance(failed, ItemError)
            assert failed.code is ItemErrorCode.RESOURCE_EXHAUSTED
            assert "out of memory" in failed.message and "22 tokens" in failed.message
            assert "x" * 20 not in failed.message  # no user text in the error
            assert await h.score(pair("after")) == [expected_score(pair("after"))]

    run(body)


@pytest.mark.parametrize(
    "make_error",
    [
        cuda_oom,
        lambda n: MemoryError(),
        lambda n: __import__("torch").cuda.OutOfMemoryError("CUDA error: allocation failed"),
    ],
    ids=["runtime-error-message", "memory-error", "torch-oom-type"],
)
def test_every_kind_of_oom_is_split(make_error: Callable[[int], BaseException]) -> None:
    async def body() -> None:
        engine = FakeEngine(oom_above_tokens=5, oom_error=make_error)  # 2 pairs x 3 tokens
        async with Harness(engine, max_wait_s=0.1) as h:
            results = await asyncio.gather(h.score(pair("a")), h.score(pair("b")))
            assert results == [[expected_score(pair("a"))], [expected_score(pair("b"))]]
            assert h.sample("pairscore_oom_splits_total") == 1

    run(body)


def test_is_out_of_memory_tells_oom_from_other_failures() -> None:
    import torch

    assert is_out_of_memory(cuda_oom(1))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only RuntimeErrors by message


def test_a_non_oom_failure_after_a_split_fails_exactly_the_original_batch() -> None:
    async def body() -> None:
        engine = FakeEngine(oom_above_tokens=12)
        async with Harness(engine, max_batch_pairs=4, max_wait_s=0.1) as h:
            names = ["ok1", "FAIL", "ok3", "ok4", "ok5"]
            results = await asyncio.gather(*(h.score(pair(n)) for n in names), return_exceptions=True)
            # The first batch (4 pairs) ran out of memory, was split, and its FAIL half
            # raised: the whole first batch fails; the fifth pair, in its own batch, is fine.
            assert all(isinstance(r, BatchFailedError) for r in results[:4])
            assert results[4] == [expected_score(pair("ok5"))]

    run(body)


# --- admission, deadlines, cancellation ------------------------------------------------


def test_a_full_queue_refuses_at_once_with_a_retry_hint_and_counts() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(score_gate=gate)
        async with Harness(engine, max_batch_pairs=1, max_queue_tokens=10) as h:
            busy = asyncio.ensure_future(h.score(pair("busy")))  # 6 tokens, in the model
            await until(lambda: h.batcher.busy_seconds > 0)
            queued = asyncio.ensure_future(h.score(pair("abc")))  # 5 tokens: queued
            await asyncio.sleep(0)
            assert h.batcher.queued_tokens == 5
            assert h.sample("pairscore_queue_tokens") == 5
            with pytest.raises(QueueFullError) as info:
                await h.score(pair("abcdef"))  # 8 tokens: 5 + 8 > 10
            # Refused at once, not queued: the model has not moved (its gate is shut).
            assert not busy.done() and h.batcher.queued_tokens == 5
            assert "5 of 10 tokens" in str(info.value) and "needs 8" in str(info.value)
            assert 0 < info.value.retry_after_s <= 30
            assert h.sample("pairscore_rejected_pairs_total", reason="queue_full") == 1
            with pytest.raises(RequestLimitError, match="at most 10 tokens"):
                await h.score(pair("x" * 20))  # larger than the whole queue: never fits
            gate.set()
            assert await busy == [expected_score(pair("busy"))]
            assert await queued == [expected_score(pair("abc"))]
            assert await h.score(pair("abcdef")) == [expected_score(pair("abcdef"))]

    run(body)


def test_expired_pairs_are_dropped_before_the_model_and_counted() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(score_gate=gate)
        async with Harness(engine, max_batch_pairs=8) as h:
            busy = asyncio.ensure_future(h.score(pair("busy")))
            await until(lambda: h.batcher.busy_seconds > 0)  # "busy" is in the model
            soon = time.monotonic() + 0.05
            late = asyncio.ensure_future(h.score(pair("late1"), pair("late2"), deadline=soon))
            neighbour = asyncio.ensure_future(h.score(pair("neighbour")))
            await until(lambda: time.monotonic() > soon)  # its deadline passed, still queued
            gate.set()
            with pytest.raises(DeadlineExceededError):
                await late
            assert await neighbour == [expected_score(pair("neighbour"))]
            await busy
            with pytest.raises(DeadlineExceededError):  # already past: never queued
                await h.score(pair("past"), deadline=time.monotonic() - 1)
            assert h.sample("pairscore_dropped_pairs_total", reason="deadline") == 3
            assert h.batcher.queued_pairs == 0 and h.batcher.queued_tokens == 0
        assert engine.batches == [("busy",), ("neighbour",)]

    run(body)


def test_cancelled_pairs_are_counted_as_dropped() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(score_gate=gate)
        async with Harness(engine, max_batch_pairs=8) as h:
            busy = asyncio.ensure_future(h.score(pair("busy")))
            await until(lambda: h.batcher.busy_seconds > 0)
            doomed = asyncio.ensure_future(h.score(pair("d1"), pair("d2")))
            await until(lambda: h.batcher.queued_pairs == 2)
            doomed.cancel()
            gate.set()
            await busy
            assert h.sample("pairscore_dropped_pairs_total", reason="cancelled") == 2
            assert h.sample("pairscore_queue_tokens") == 0

    run(body)


# --- a stuck worker --------------------------------------------------------------------


def test_abandoning_a_stuck_worker_fails_its_callers_and_refuses_work_until_it_answers() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(score_gate=gate)
        async with Harness(engine, max_batch_pairs=1) as h:
            stuck = asyncio.ensure_future(h.score(pair("stuck")))
            await asyncio.sleep(0.1)
            waiting = asyncio.ensure_future(h.score(pair("waiting")))
            await asyncio.sleep(0.05)
            assert h.batcher.busy_seconds > 0.05
            h.batcher.abandon_in_flight("worker stuck (test)")
            for task in (stuck, waiting):
                with pytest.raises(WorkerUnavailableError, match="stuck"):
                    await task
            assert h.batcher.stalled
            with pytest.raises(WorkerUnavailableError):
                await h.score(pair("refused"))
            # Every pair of a failed request is dropped, the one in the model too (issue 12:
            # before, in-flight pairs were in no counter); the refused one was never admitted.
            assert h.sample("pairscore_dropped_pairs_total", reason="worker_unavailable") == 2
            assert h.sample("pairscore_rejected_pairs_total", reason="worker_unavailable") == 1
            gate.set()  # the worker answers again
            for _ in range(100):
                if not h.batcher.stalled:
                    break
                await asyncio.sleep(0.01)
            assert not h.batcher.stalled
            assert await h.score(pair("again")) == [expected_score(pair("again"))]
        assert engine.batches == [("stuck",), ("again",)]

    run(body)


def test_stop_does_not_wait_forever_for_a_stuck_worker() -> None:
    async def body() -> None:
        gate = threading.Event()
        engine = FakeEngine(score_gate=gate)
        h = Harness(engine, max_batch_pairs=1)
        await h.__aenter__()
        stuck = asyncio.ensure_future(h.score(pair("stuck")))
        queued = asyncio.ensure_future(h.score(pair("queued")))
        await until(lambda: h.batcher.busy_seconds > 0)
        await h.batcher.stop(timeout=0.2)
        assert engine.batches == []  # stop returned while the worker was still stuck
        for task in (stuck, queued):
            with pytest.raises(BatcherClosedError):
                await task
        gate.set()
        h.executor.shutdown(wait=True)

    run(body)
