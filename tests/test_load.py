"""Issue 5 load test: a bounded open-loop generator against a loopback server process.

32 concurrent streams for a fixed time offer more than twice what the server
can score: 16 send unary Score calls at a fixed rate whether or not earlier
ones were answered (each bounded to a few outstanding calls), 16 are
ScoreStream calls whose messages go out at a fixed rate. Every request must
be answered exactly once, with scores or RESOURCE_EXHAUSTED (a whole unary
call, or items of a stream message), nothing may hang, latency stays bounded
because the admission queue is, and the server's RSS stays bounded. The
achieved throughput and latency percentiles are printed (``pytest -s``) and
recorded as test properties. Loopback only.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.fake_engine import PROMPT_TOKEN_LOGPROB, RESPONSE_TOKEN_LOGPROB
from harness.servers import FAKE_ENGINE_SCRIPT, clean_env, free_port

DURATION_S = 3.0
UNARY_STREAMS, UNARY_RATE, UNARY_OUTSTANDING = 16, 20.0, 4  # calls/s each; cap per stream
STREAMS, STREAM_RATE = 16, 10.0  # ScoreStream calls, messages/s each
PAIRS_PER_REQUEST = 2
CALL_TIMEOUT_S = 10.0
# The server: 8 pairs per 20 ms forward pass (~400 pairs/s), 128 queued tokens (~20 pairs).
FORWARD_DELAY_S = 0.02
SERVER_FLAGS = ("--max-batch-pairs", "8", "--max-wait-ms", "2", "--max-queue-tokens", "128")
RSS_GROWTH_LIMIT_MB = 64.0

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/self/status"), reason="reads the server's RSS from /proc"
)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Tally:
    """What the generator saw: per request id, how many answers and their outcome."""

    answers: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    ok_latencies: list[float] = field(default_factory=list)
    rejected_latencies: list[float] = field(default_factory=list)
    sent: set[str] = field(default_factory=set)
    skipped: int = 0  # ticks where a unary stream already had its maximum outstanding
    problems: list[str] = field(default_factory=list)
    pairs_scored: int = 0


def _request(rid: str) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        pairs=[
            pb.Pair(id=f"{rid}/{j}", prompt=f"{rid}:{j}", response="!" * (j + 1))
            for j in range(PAIRS_PER_REQUEST)
        ]
    )


def _check_results(rid: str, response: pb.ScoreResponse, tally: Tally) -> str:
    """Validate one answer; returns 'ok' or 'resource_exhausted' (or records a problem)."""
    ids = [r.id for r in response.results]
    if ids != [f"{rid}/{j}" for j in range(PAIRS_PER_REQUEST)]:
        tally.problems.append(f"{rid}: wrong result ids {ids}")
        return "bad"
    kinds = set()
    for j, result in enumerate(response.results):
        if result.HasField("scores"):
            m, n = len(f"{rid}:{j}"), j + 1
            s = result.scores
            want = (PROMPT_TOKEN_LOGPROB * m, RESPONSE_TOKEN_LOGPROB * n)
            if (s.prompt_logprob, s.conditional_logprob) != want:
                tally.problems.append(f"{rid}/{j}: scores {s} are not this pair's")
            kinds.add("ok")
            tally.pairs_scored += 1
        elif result.error.code == pb.ITEM_ERROR_CODE_RESOURCE_EXHAUSTED:
            kinds.add("resource_exhausted")
        else:
            tally.problems.append(f"{rid}/{j}: unexpected item error {result.error}")
    return "ok" if kinds == {"ok"} else "resource_exhausted" if kinds else "bad"


async def _unary_stream(k: int, channel: grpc.aio.Channel, start: float, end: float, tally: Tally) -> None:
    stub = pb_grpc.ScoringServiceStub(channel)
    outstanding: set[asyncio.Task[None]] = set()
    all_calls: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()

    async def one(rid: str) -> None:
        sent = loop.time()
        try:
            response = await stub.Score(_request(rid), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            tally.answers[rid] += 1
            code = exc.code().name.lower()
            tally.outcomes[code] += 1
            if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                tally.rejected_latencies.append(loop.time() - sent)
                if "grpc-retry-pushback-ms" not in dict(exc.trailing_metadata() or ()):
                    tally.problems.append(f"{rid}: RESOURCE_EXHAUSTED without a retry hint")
            else:
                tally.problems.append(f"{rid}: {exc.code().name} {exc.details()}")
            return
        tally.answers[rid] += 1
        kind = _check_results(rid, response, tally)
        tally.outcomes[kind] += 1
        if kind == "ok":
            tally.ok_latencies.append(loop.time() - sent)

    i = 0
    next_tick = start
    while (now := loop.time()) < end:
        if len(outstanding) < UNARY_OUTSTANDING:
            rid = f"u{k}-{i}"
            tally.sent.add(rid)
            task = asyncio.create_task(one(rid))
            outstanding.add(task)
            all_calls.append(task)
            task.add_done_callback(outstanding.discard)
        else:
            tally.skipped += 1
        i += 1
        next_tick += 1.0 / UNARY_RATE
        await asyncio.sleep(max(0.0, next_tick - now))
    await asyncio.gather(*all_calls)


async def _score_stream(k: int, channel: grpc.aio.Channel, start: float, end: float, tally: Tally) -> None:
    stub = pb_grpc.ScoringServiceStub(channel)
    loop = asyncio.get_running_loop()
    order: list[str] = []
    sent_at: dict[str, float] = {}

    async def messages() -> AsyncIterator[pb.ScoreRequest]:
        i = 0
        next_tick = start
        while (now := loop.time()) < end:
            rid = f"s{k}-{i}"
            order.append(rid)
            tally.sent.add(rid)
            sent_at[rid] = now
            yield _request(rid)
            i += 1
            next_tick += 1.0 / STREAM_RATE
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    call = stub.ScoreStream(messages(), timeout=end - loop.time() + CALL_TIMEOUT_S)
    answered = 0
    try:
        async for response in call:
            if answered >= len(order):
                tally.problems.append(f"stream {k}: an answer to a message never sent")
                break
            rid = order[answered]  # answers come in request order, one per message
            answered += 1
            tally.answers[rid] += 1
            kind = _check_results(rid, response, tally)
            tally.outcomes[kind] += 1
            latency = loop.time() - sent_at[rid]
            (tally.ok_latencies if kind == "ok" else tally.rejected_latencies).append(latency)
    except grpc.aio.AioRpcError as exc:
        tally.problems.append(f"stream {k} ended {exc.code().name}: {exc.details()}")


async def _generate(target: str) -> tuple[Tally, float]:
    tally = Tally()
    channels = [grpc.aio.insecure_channel(target) for _ in range(4)]
    try:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        end = start + DURATION_S
        workers = [_unary_stream(k, channels[k % 4], start, end, tally) for k in range(UNARY_STREAMS)] + [
            _score_stream(k, channels[k % 4], start, end, tally) for k in range(STREAMS)
        ]
        await asyncio.wait_for(asyncio.gather(*workers), DURATION_S + 2 * CALL_TIMEOUT_S)
        return tally, loop.time() - start
    finally:
        for channel in channels:
            await channel.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _wait_serving(popen: subprocess.Popen[bytes], target: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert popen.poll() is None, log.read_text()
        try:
            with grpc.insecure_channel(target) as channel:
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=2)
                    .status
                )
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"server not SERVING:\n{log.read_text()}")


def test_open_loop_overload_is_answered_exactly_once_with_bounded_latency_and_memory(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "server.log"
    popen = subprocess.Popen(
        [sys.executable, str(FAKE_ENGINE_SCRIPT), "--forward-delay", str(FORWARD_DELAY_S),
         "--", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "off", *SERVER_FLAGS],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=clean_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        _wait_serving(popen, target, log)
        baseline = rss_mb(popen.pid)
        samples: list[float] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.05):
                samples.append(rss_mb(popen.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tally, elapsed = asyncio.run(_generate(target))
        sampling.set()
        sampler.join(timeout=5)
        alive_after = popen.poll() is None
    finally:
        popen.terminate()
        exit_code = popen.wait(timeout=20)

    ok = len(tally.ok_latencies)
    summary = {
        "requests_sent": len(tally.sent),
        "ok": ok,
        "resource_exhausted": len(tally.rejected_latencies),
        "client_bound_skips": tally.skipped,
        "pairs_scored_per_s": round(tally.pairs_scored / elapsed, 1),
        "ok_requests_per_s": round(ok / elapsed, 1),
        "ok_p50_ms": round(1000 * _percentile(tally.ok_latencies, 50), 1),
        "ok_p99_ms": round(1000 * _percentile(tally.ok_latencies, 99), 1),
        "rejected_p50_ms": round(1000 * _percentile(tally.rejected_latencies, 50), 1),
        "rejected_p99_ms": round(1000 * _percentile(tally.rejected_latencies, 99), 1),
        "rss_baseline_mb": round(baseline, 1),
        "rss_peak_mb": round(max(samples, default=baseline), 1),
    }
    for key, value in summary.items():
        record_property(key, value)
    print(f"\nload test ({DURATION_S:.0f} s, {UNARY_STREAMS}+{STREAMS} streams): {summary}")

    assert not tally.problems, tally.problems[:10]
    assert alive_after, log.read_text()
    assert exit_code == 0, log.read_text()
    # Every request was answered exactly once, and nothing else was answered.
    assert set(tally.answers) == tally.sent
    assert set(tally.answers.values()) == {1}
    assert set(tally.outcomes) <= {"ok", "resource_exhausted"}, tally.outcomes
    # The generator really overloaded the server, and the server still did real work.
    assert tally.outcomes["resource_exhausted"] > 0 and ok > 0
    # A bounded queue bounds latency: ~20 queued pairs at ~400 pairs/s is ~50 ms of wait.
    # Measured on 2 cores at load 8.5 and 11: ok p99 184 and 477 ms, refusals' p50 17 and
    # 26 ms; the bounds are 4 and 19 times the busier figures (the latency grows with load).
    assert _percentile(tally.ok_latencies, 99) < 2.0
    assert _percentile(tally.rejected_latencies, 50) < 0.5  # refusals are immediate:
    # they wait for no batch, however slow the machine (26 ms against 125 ms at load 11)
    assert _percentile(tally.rejected_latencies, 50) < _percentile(tally.ok_latencies, 50)
    assert max(samples, default=baseline) - baseline < RSS_GROWTH_LIMIT_MB
    assert "Traceback" not in log.read_text()
