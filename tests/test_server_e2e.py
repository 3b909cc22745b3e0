"""End to end: a real grpc.aio server on a loopback port, the real sync client.

The server runs in a background thread with its own event loop; the tests
talk to it over 127.0.0.1 like any client would. Tests that take the
``engine_for_e2e`` fixture run against the fake engine and against a real
ScoringEngine on a tiny random GPT-2 (``tiny_engine`` from conftest.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pairscore import cli
from pairscore.client import ScoringError
from pairscore.types import (
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    ScoreOptions,
    Side,
    TokenizationMode,
)
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.config import ServerConfig
from pairscore_server.engine import ScoredBatch
from pairscore_server.engine.spec import ModelLoadError, ModelSpec
from pairscore_server.lifecycle import RunningServer
from pairscore_server.servicer import SERVICE_NAME

from harness.fake_engine import FakeEngine, expected_score
from harness.servers import ServerThread, make_config, metric_samples

T = TypeVar("T")
FAIL_ID = "FAIL"
ROOT = Path(__file__).resolve().parents[1]
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# --- harness ------------------------------------------------------------------------


class FailOnIdEngine:
    """Wraps any engine; score() raises for a batch holding a pair whose id starts with FAIL."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def score(self, prepared: Sequence[Any]) -> ScoredBatch:
        if any(p.id.startswith(FAIL_ID) for p in prepared):
            raise RuntimeError("injected failure for a FAIL pair")
        return self._inner.score(prepared)


@pytest.fixture(params=["fake", "tiny"])
def engine_for_e2e(request: pytest.FixtureRequest) -> Any:
    """The engine behind the server: the fake one, or a real engine on a tiny GPT-2."""
    if request.param == "fake":
        return FakeEngine(max_context=64)
    try:
        return request.getfixturevalue("tiny_engine")
    except pytest.FixtureLookupError:
        pytest.skip("the tiny_engine fixture is not available")


@pytest.fixture
def e2e_server(engine_for_e2e: Any, start_server: Callable[..., ServerThread]) -> ServerThread:
    """A ready server on ``engine_for_e2e`` (wrapped so that FAIL ids break their batch)."""
    return start_server(FailOnIdEngine(engine_for_e2e))


def reference_scores(engine: Any, pairs: Sequence[Pair], options: ScoreOptions) -> list[Any]:
    """What the engine gives for each pair alone, computed in-process."""
    return [
        item if isinstance(item, ItemError) else engine.score([item]).scores[0]
        for item in engine.prepare(pairs, options)
    ]


def too_long_pair(engine: Any, pair_id: str) -> Pair:
    n = engine.info.max_context_tokens
    return Pair(prompt="a " * n, response=" b" * n, id=pair_id)


def assert_same_score(got: Any, want: Any) -> None:
    assert isinstance(got, PairScore), got
    assert got.id == want.id
    assert (got.prompt_tokens, got.response_tokens) == (want.prompt_tokens, want.response_tokens)
    for field in ("joint_logprob", "prompt_logprob", "conditional_logprob"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-4)


MIXED = [
    Pair("Hello", " world", id="short"),
    Pair("The capital of France is Paris. The capital of Italy is", " Rome.", id="long"),
    Pair("", "Unconditional response.", id="empty-prompt"),
    Pair("Question: what is two plus two?", "", id="empty-response"),
    Pair("a", " b", id="tiny"),
]


# --- Score -------------------------------------------------------------------------------


def test_score_keeps_request_order_across_mixed_lengths_and_flags_too_long(
    engine_for_e2e: Any, e2e_server: ServerThread
) -> None:
    pairs = [*MIXED[:2], too_long_pair(engine_for_e2e, "too-long"), *MIXED[2:]]
    want = reference_scores(engine_for_e2e, pairs, ScoreOptions())
    with e2e_server.client() as client:
        got = client.score(pairs)
    assert [r.id for r in got] == [p.id for p in pairs]
    assert isinstance(got[2], ItemError)
    assert got[2].code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert got[2].message == want[2].message
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:], strict=True):
        assert_same_score(g, w)


def test_score_accepts_tuples_and_returns_tokens(engine_for_e2e: Any, e2e_server: ServerThread) -> None:
    with e2e_server.client() as client:
        [result] = client.score([("Hello", " world")], return_tokens=True)
        assert client.score([]) == []
    assert isinstance(result, PairScore)
    assert len(result.tokens) == result.prompt_tokens + result.response_tokens
    sides = [t.side for t in result.tokens]
    assert sides == [Side.PROMPT] * result.prompt_tokens + [Side.RESPONSE] * result.response_tokens
    assert sum(t.logprob for t in result.tokens) == pytest.approx(result.joint_logprob, abs=1e-4)


def test_score_joint_tokenization_is_passed_through(engine_for_e2e: Any, e2e_server: ServerThread) -> None:
    pairs = [Pair("The capital of France is", " Paris.", id="j")]
    want = reference_scores(engine_for_e2e, pairs, ScoreOptions(tokenization=TokenizationMode.JOINT))
    with e2e_server.client() as client:
        [got] = client.score(pairs, tokenization=TokenizationMode.JOINT)
    assert_same_score(got, want[0])


def test_score_batch_failure_is_internal_and_the_server_keeps_serving(
    e2e_server: ServerThread,
) -> None:
    with e2e_server.client() as client:
        with pytest.raises(ScoringError) as info:
            client.score([Pair("x", "y", id=FAIL_ID)])
        assert info.value.code is grpc.StatusCode.INTERNAL
        assert "injected failure" in info.value.message
        [ok] = client.score([Pair("x", "y", id="after")])
    assert isinstance(ok, PairScore)


def test_unknown_enum_is_invalid_argument(e2e_server: ServerThread) -> None:
    with grpc.insecure_channel(e2e_server.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        bad = pb.ScoreRequest(
            pairs=[pb.Pair(prompt="x", response="y")], options=pb.ScoreOptions(tokenization=99)
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(bad, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "tokenization" in info.value.details()


# --- ScoreStream ---------------------------------------------------------------------------


def test_score_stream_answers_in_order_with_item_errors_and_goes_on(
    engine_for_e2e: Any, start_server: Callable[..., ServerThread]
) -> None:
    # One message in flight at a time, so the FAIL message never shares a batch.
    st = start_server(FailOnIdEngine(engine_for_e2e), stream_max_in_flight=1)
    messages = [
        [MIXED[0], MIXED[1]],
        [Pair("doomed", " pair", id=FAIL_ID), Pair("doomed", " too", id="FAIL-2")],
        [too_long_pair(engine_for_e2e, "too-long"), MIXED[2]],
        [],
        [MIXED[3], MIXED[4]],
    ]
    with st.client() as client:
        responses = list(client.score_stream(iter(messages)))
    assert [[r.id for r in resp] for resp in responses] == [[p.id for p in m] for m in messages]
    assert all(isinstance(r, PairScore) for r in responses[0] + responses[4])
    assert [r.code for r in responses[1]] == [ItemErrorCode.INTERNAL] * 2
    assert "injected failure" in responses[1][0].message
    assert responses[2][0].code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert isinstance(responses[2][1], PairScore)
    assert responses[3] == []
    want = reference_scores(engine_for_e2e, [MIXED[0], MIXED[3]], ScoreOptions())
    assert_same_score(responses[0][0], want[0])
    assert_same_score(responses[4][0], want[1])


def test_score_stream_unknown_enum_fails_only_that_message(e2e_server: ServerThread) -> None:
    requests = [
        pb.ScoreRequest(pairs=[pb.Pair(id="a", prompt="x", response="y")]),
        pb.ScoreRequest(
            pairs=[pb.Pair(id="b", prompt="x", response="y")],
            options=pb.ScoreOptions(tokenization=42),
        ),
        pb.ScoreRequest(pairs=[pb.Pair(id="c", prompt="x", response="y")]),
    ]
    with grpc.insecure_channel(e2e_server.target) as channel:
        responses = list(pb_grpc.ScoringServiceStub(channel).ScoreStream(iter(requests), timeout=10))
    assert [r.results[0].id for r in responses] == ["a", "b", "c"]
    assert responses[0].results[0].HasField("scores")
    assert responses[1].results[0].error.code == pb.ITEM_ERROR_CODE_INVALID_ARGUMENT
    assert responses[2].results[0].HasField("scores")


def test_score_stream_works_on_several_messages_at_once_but_bounded(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(forward_delay_s=0.15)
    st = start_server(engine, stream_max_in_flight=3, max_wait_ms=50)
    messages = [[Pair(f"m{i}", "!", id=f"m{i}")] for i in range(9)]
    with st.client() as client:
        responses = list(client.score_stream(iter(messages)))
    assert [resp[0] for resp in responses] == [expected_score(m[0]) for m in messages]
    sizes = [len(b) for b in engine.batches]
    assert sum(sizes) == 9
    assert max(sizes) > 1  # pipelined: pairs of several messages shared a forward pass
    assert max(sizes) <= 3  # never more than stream_max_in_flight messages in work


# --- model info, health, reflection, metrics ------------------------------------------------


def test_model_info_describes_the_engine_and_the_limits(
    engine_for_e2e: Any, e2e_server: ServerThread
) -> None:
    with e2e_server.client() as client:
        info = client.model_info()
    limits = e2e_server.server.limits
    assert limits is not None
    assert info == dataclasses.replace(
        engine_for_e2e.info,
        max_pairs_per_request=limits.max_pairs_per_request,
        max_text_chars=limits.max_text_chars,
        max_item_tokens=limits.max_item_tokens,
        max_message_bytes=limits.max_message_bytes,
        max_queue_tokens=limits.max_queue_tokens,
        max_request_chars=limits.max_request_chars,
        max_preparing_chars=limits.max_preparing_chars,
        max_response_bytes=limits.max_response_bytes,
    )
    config = ServerConfig()
    assert info.max_pairs_per_request == config.max_pairs_per_request
    assert info.max_text_chars == config.max_text_chars
    assert info.max_item_tokens == info.max_context_tokens  # default: the model's context
    assert info.max_message_bytes == config.max_message_bytes
    assert info.max_queue_tokens == 32 * engine_for_e2e.max_batch_tokens


def test_health_reports_serving_for_server_and_service(e2e_server: ServerThread) -> None:
    with e2e_server.client() as client:
        assert client.health() == "SERVING"
        assert client.health("") == "SERVING"
        with pytest.raises(ScoringError) as info:
            client.health("no.such.Service")
    assert info.value.code is grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(e2e_server: ServerThread) -> None:
    with grpc.insecure_channel(e2e_server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME} <= services
    assert SERVICE_NAME == "pairscore.v1.ScoringService"


def test_metrics_endpoint_parses_and_counters_move(e2e_server: ServerThread) -> None:
    ok_score = ("pairscore_requests_total", (("code", "OK"), ("method", "Score")))
    ok_pairs = ("pairscore_pairs_total", (("outcome", "ok"),))
    before = metric_samples(e2e_server.metrics_text())
    with e2e_server.client() as client:
        client.score([Pair("Hello", " world"), Pair("a", " b")])
        client.model_info()
    after = metric_samples(e2e_server.metrics_text())
    assert after[ok_score] == before.get(ok_score, 0) + 1
    assert after[ok_pairs] == before.get(ok_pairs, 0) + 2
    assert after[("pairscore_requests_total", (("code", "OK"), ("method", "GetModelInfo")))] >= 1
    assert after[("pairscore_tokens_total", (("side", "response"),))] > 0
    assert after[("pairscore_request_duration_seconds_count", (("method", "Score"),))] >= 1
    assert after[("pairscore_batch_pairs_count", ())] >= 1
    assert after[("pairscore_model_loaded", ())] == 1
    build = [k for k in after if k[0] == "pairscore_build_info"]
    assert len(build) == 1 and dict(build[0][1])["dtype"]


def test_metrics_count_failures_by_status_code(e2e_server: ServerThread) -> None:
    with e2e_server.client() as client, pytest.raises(ScoringError):
        client.score([Pair("x", "y", id=FAIL_ID)])
    after = metric_samples(e2e_server.metrics_text())
    assert after[("pairscore_requests_total", (("code", "INTERNAL"), ("method", "Score")))] == 1


# --- start-up and shutdown ---------------------------------------------------------------------


def test_not_serving_until_warmup_ran(start_server: Callable[..., ServerThread]) -> None:
    gate = threading.Event()
    engine = FakeEngine(warmup_gate=gate)
    st = start_server(engine, wait_ready=False)
    try:
        with st.client() as client:
            assert client.health() == "NOT_SERVING"
            assert client.health("") == "NOT_SERVING"
            with pytest.raises(ScoringError) as info:
                client.score([("x", "y")])
            assert info.value.code is grpc.StatusCode.UNAVAILABLE
            assert st.server.ready is False
            gate.set()
            st.call(st.server.wait_ready())
            assert client.health() == "SERVING"
            assert client.score([("x", "y")]) == [expected_score(Pair("x", "y"))]
        assert engine.warmups == 1
    finally:
        gate.set()


def test_expired_deadline_drops_queued_pairs_and_is_counted(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(forward_delay_s=0.6)
    st = start_server(engine, max_batch_pairs=1)
    results: list[Any] = []
    with st.client() as client:
        busy = threading.Thread(target=lambda: results.append(client.score([("busy", "!")])))
        busy.start()
        while not engine.batches:  # "busy" occupies the model
            time.sleep(0.01)
        with pytest.raises(ScoringError) as info:
            client.score([("expires", "!")], timeout=0.2)  # queued behind "busy"
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        busy.join(timeout=10)
        assert client.score([("after", "!")]) == [expected_score(Pair("after", "!"))]
    assert results == [[expected_score(Pair("busy", "!"))]]
    assert engine.batches == [("busy",), ("after",)]  # the expired pair never ran
    samples = metric_samples(st.metrics_text())
    key = ("pairscore_requests_total", (("code", "DEADLINE_EXCEEDED"), ("method", "Score")))
    assert samples[key] == 1


def test_a_taken_port_raises_oserror_and_releases_the_metrics_port() -> None:
    async def body() -> None:
        first = RunningServer(make_config(metrics_port=None), engine=FakeEngine())
        await first.start()
        second = RunningServer(make_config(port=first.port), engine=FakeEngine())
        try:
            with pytest.raises(OSError, match="cannot listen"):
                await second.start()
            assert second.metrics_port is not None
            with pytest.raises(OSError):  # the metrics endpoint was closed again
                urllib.request.urlopen(f"http://127.0.0.1:{second.metrics_port}/metrics", timeout=2)
        finally:
            await second.stop(grace=0)
            await first.stop(grace=0)

    asyncio.run(asyncio.wait_for(body(), 20))


def test_a_model_that_fails_to_load_keeps_health_not_serving() -> None:
    def broken_loader(spec: Any) -> Any:
        raise ModelLoadError(f"no model at {spec.model}")

    async def body() -> None:
        running = RunningServer(make_config(model=ModelSpec(model="/nowhere")), engine_loader=broken_loader)
        await running.start()
        try:
            with pytest.raises(ModelLoadError, match="/nowhere"):
                await running.wait_ready()
            assert not running.ready
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", SERVICE_NAME):
                    request = health_pb2.HealthCheckRequest(service=service)
                    response = await stub.Check(request, timeout=10)
                    assert response.status == _NOT_SERVING
        finally:
            await running.stop(grace=0)

    asyncio.run(asyncio.wait_for(body(), 20))


def test_graceful_stop_finishes_in_flight_work_and_refuses_new_calls(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(forward_delay_s=1.0)
    st = start_server(engine)
    results: list[Any] = []
    with st.client() as client:
        caller = threading.Thread(target=lambda: results.append(client.score([("slow", "!")])))
        caller.start()
        deadline = time.monotonic() + 10
        while not engine.batches and time.monotonic() < deadline:  # the request is in the model
            time.sleep(0.01)
        assert engine.batches
        stopping = st.submit(st.server.stop(grace=10))
        time.sleep(0.2)
        with st.client(timeout=5) as late_client, pytest.raises(ScoringError) as info:
            late_client.score([("late", "!")])
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
        caller.join(timeout=10)
        stopping.result(timeout=10)
    assert results == [[expected_score(Pair("slow", "!"))]]
    assert engine.batches == [("slow",)]


# --- CLI against the server ----------------------------------------------------------------------


def test_cli_query_and_info(e2e_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["query", "--target", e2e_server.target, "Hello", " world", "a", " b"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 1]
    assert lines[0]["joint_logprob"] == pytest.approx(
        lines[0]["prompt_logprob"] + lines[0]["conditional_logprob"]
    )
    assert {"prompt_tokens", "response_tokens"} <= lines[0].keys()
    # Text pairs, nothing truncated: the line is the README quickstart's, without the
    # chat/truncation fields.
    assert not {"prompt_tokens_dropped", "rendered_prompt", "rendered_response"} & lines[0].keys()
    assert cli.main(["info", "--target", e2e_server.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["max_context_tokens"] > 0
    assert info["prefix_policy"] in {"bos", "document_separator", "custom"}


def test_cli_query_rejects_an_odd_number_of_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["query", "--target", "127.0.0.1:1", "only a prompt"])
    assert info.value.code == 2
    assert "even number" in capsys.readouterr().err


def test_forward_token_accounting_reaches_metrics(
    tiny_engine: Any, start_server: Callable[..., ServerThread]
) -> None:
    """Real, padded and reused (shared-prompt) token positions are exported as counters."""
    st = start_server(tiny_engine, max_wait_ms=50)
    prompt = "The capital of France is"
    with st.client() as client:
        client.score([Pair(prompt, " Paris."), Pair(prompt, " Rome."), Pair(prompt, " a city")])
    after = metric_samples(st.metrics_text())
    real = after[("pairscore_forward_tokens_total", (("kind", "real"),))]
    padded = after[("pairscore_forward_tokens_total", (("kind", "padded"),))]
    reused = after[("pairscore_forward_tokens_total", (("kind", "reused"),))]
    prompt_len = 1 + len(tiny_engine.pair_tokenizer.encode(prompt, "", TokenizationMode.SEPARATE).ids)
    assert reused >= 2 * prompt_len  # the prompt ran once for three responses
    assert padded >= real > 0


def test_replica_busy_time_is_exported_per_replica(
    gpt2_family: Any, start_server: Callable[..., ServerThread]
) -> None:
    from pairscore_server.engine.replicas import ReplicatedEngine

    from harness.models import make_engine

    model, tokenizer = gpt2_family
    engine = ReplicatedEngine([make_engine(model, tokenizer), make_engine(model, tokenizer)])
    st = start_server(engine, max_wait_ms=50)
    with st.client() as client:
        results = client.score([Pair(f"prompt number {i}", f" response {i}") for i in range(8)])
    assert all(isinstance(r, PairScore) for r in results)
    after = metric_samples(st.metrics_text())
    for replica in ("0", "1"):
        assert after[("pairscore_replica_busy_seconds_total", (("replica", replica),))] > 0
