"""The dynamic batcher, against the fake engine (no model, no gRPC)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from pairscore.types import Pair, ScoreOptions
from pairscore_server.batcher import Batcher, BatcherClosedError, BatchFailedError
from pairscore_server.metrics import Metrics

from fake_engine import FakeEngine, expected_score

T = TypeVar("T")
MODEL_THREAD = "test-model"


def run(make: Callable[[], Awaitable[T]], *, timeout: float = 15.0) -> T:
    """Run one async test body in a fresh event loop, with a safety timeout."""

    async def guarded() -> T:
        return await asyncio.wait_for(make(), timeout)

    return asyncio.run(guarded())


class Harness:
    """A started batcher on a fake engine, with its executor and metrics."""

    def __init__(self, engine: FakeEngine, *, max_batch_pairs: int = 64, max_wait_s: float = 0.0):
        self.engine = engine
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=MODEL_THREAD)
        self.batcher = Batcher(
            engine,
            self.executor,
            max_batch_pairs=max_batch_pairs,
            max_wait_s=max_wait_s,
            metrics=self.metrics,
        )

    async def __aenter__(self) -> Harness:
        self.batcher.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.batcher.stop()
        self.executor.shutdown(wait=True)

    async def score(self, *pairs: Pair) -> list:
        prepared = self.engine.prepare(pairs, ScoreOptions())
        return await self.batcher.submit(prepared)

    def sample(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(name)
        return 0.0 if value is None else value


def pair(prompt: str, response: str = "!") -> Pair:
    return Pair(prompt=prompt, response=response, id=prompt)


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


def test_batches_stay_under_the_padded_token_budget_and_pair_limit() -> None:
    async def body() -> None:
        engine = FakeEngine(max_batch_tokens=40, max_context=64)
        async with Harness(engine, max_batch_pairs=5, max_wait_s=0.05) as h:
            pairs = [pair("p" * (i % 7) + str(i), "r" * (i % 5)) for i in range(40)]
            results = await asyncio.gather(*(h.score(p) for p in pairs))
            assert [r[0] for r in results] == [expected_score(p) for p in pairs]
        assert sum(len(b) for b in engine.batch_lengths) == 40
        for lengths in engine.batch_lengths:
            assert len(lengths) <= 5
            assert max(lengths) * len(lengths) <= 40
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
    async def body() -> None:
        async with Harness(FakeEngine(), max_wait_s=0.3) as h:
            started = time.monotonic()
            first = asyncio.ensure_future(h.score(pair("first")))
            await asyncio.sleep(0.1)
            second = await h.score(pair("second"))  # joins the batch the first one opened
            assert await first == [expected_score(pair("first"))]
            assert second == [expected_score(pair("second"))]
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 1.5
            assert h.engine.batches == [("first", "second")]

            started = time.monotonic()
            await h.score(pair("alone"))  # nobody joins: dispatched once max_wait passes
            assert 0.25 <= time.monotonic() - started < 1.5
            assert h.engine.batches[-1] == ("alone",)

    run(body)


def test_max_wait_zero_dispatches_at_once() -> None:
    async def body() -> None:
        async with Harness(FakeEngine(), max_wait_s=0.0) as h:
            started = time.monotonic()
            assert await h.score(pair("now")) == [expected_score(pair("now"))]
            assert time.monotonic() - started < 0.2

    run(body)


def test_failed_batch_fails_exactly_its_requests_and_the_loop_keeps_serving() -> None:
    async def body() -> None:
        engine = FakeEngine()
        async with Harness(engine, max_batch_pairs=2, max_wait_s=0.2) as h:
            names = ["ok1", "FAIL", "ok3", "ok4"]
            results = await asyncio.gather(
                *(h.score(pair(n)) for n in names), return_exceptions=True
            )
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
        engine = FakeEngine(forward_delay_s=0.3)
        async with Harness(engine, max_batch_pairs=8) as h:
            busy = asyncio.ensure_future(h.score(pair("busy")))
            await asyncio.sleep(0.1)  # "busy" is now in the model; the next ones queue
            doomed = asyncio.ensure_future(h.score(pair("doomed1"), pair("doomed2")))
            neighbour = asyncio.ensure_future(h.score(pair("neighbour")))
            await asyncio.sleep(0.05)
            assert h.batcher.queued_pairs == 3
            doomed.cancel()
            await asyncio.sleep(0)
            assert h.batcher.queued_pairs == 1
            assert h.sample("pairscore_queue_pairs") == 1
            assert await busy == [expected_score(pair("busy"))]
            assert await neighbour == [expected_score(pair("neighbour"))]
            assert doomed.cancelled()
        assert engine.batches == [("busy",), ("neighbour",)]

    run(body)


def test_cancel_while_its_batch_runs_leaves_the_batch_mates_alone() -> None:
    async def body() -> None:
        engine = FakeEngine(forward_delay_s=0.3)
        async with Harness(engine, max_wait_s=0.05) as h:
            leaver = asyncio.ensure_future(h.score(pair("leaver")))
            stayer = asyncio.ensure_future(h.score(pair("stayer")))
            await asyncio.sleep(0.15)  # both are in the running batch
            leaver.cancel()
            assert await stayer == [expected_score(pair("stayer"))]
            assert leaver.cancelled()
        assert engine.batches == [("leaver", "stayer")]

    run(body)


def test_model_work_runs_off_the_event_loop_on_one_thread() -> None:
    async def body() -> None:
        engine = FakeEngine(forward_delay_s=0.2)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with Harness(engine, max_batch_pairs=1) as h:
            tick_task = asyncio.ensure_future(ticker())
            await asyncio.gather(*(h.score(pair(f"p{i}")) for i in range(3)))  # >= 0.6 s
            tick_task.cancel()
        assert ticks >= 20  # the loop kept ticking while the engine slept
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
