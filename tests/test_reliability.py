"""Issue 5 in-process: limits, hostile input, malformed bytes, overload, deadlines,
cancellation, out-of-memory splitting and a stuck or crashed model worker.

Every test talks to a real grpc.aio server on a loopback port (the harness
of test_server_e2e.py), with the fake engine or a real engine on a tiny
GPT-2, through raw gRPC stubs or the existing ScoringClient.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pairscore.convert import model_info_from_pb, request_to_pb, response_from_pb
from pairscore.types import (
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    PairScore,
    ScoreOptions,
    ScoreOutcome,
)
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.config import ServerConfig
from pairscore_server.lifecycle import RunningServer
from pairscore_server.servicer import RETRY_PUSHBACK_KEY

from harness.fake_engine import FakeEngine, expected_score
from harness.servers import ServerThread, metric_samples

SCORE = "/pairscore.v1.ScoringService/Score"
SCORE_STREAM = "/pairscore.v1.ScoringService/ScoreStream"
MODEL_INFO = "/pairscore.v1.ScoringService/GetModelInfo"
SECRET = "TOP-SECRET-USER-TEXT-7f3a"


class Raw:
    """Plain stubs on one channel, without client-side retries: the server's answers as they are.

    RPC failures raise grpc.RpcError (``.code()``, ``.details()``).
    """

    def __init__(self, target: str, *, timeout: float = 10.0) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.ScoringServiceStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def score(
        self, pairs: Sequence[Pair | tuple[str, str]], *, return_tokens: bool = False
    ) -> list[ScoreOutcome]:
        request = request_to_pb(
            [p if isinstance(p, Pair) else Pair(*p) for p in pairs],
            ScoreOptions(return_tokens=return_tokens),
        )
        return response_from_pb(self.stub.Score(request, timeout=self.timeout))

    def stream(self, batches: Sequence[Sequence[tuple[str, str]]]) -> list[list[ScoreOutcome]]:
        requests = [request_to_pb([Pair(*p) for p in b], ScoreOptions()) for b in batches]
        call = self.stub.ScoreStream(iter(requests), timeout=self.timeout)
        return [response_from_pb(r) for r in call]

    def info(self) -> ModelInfo:
        return model_info_from_pb(self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10))


def health(target: str, service: str = "") -> str:
    with grpc.insecure_channel(target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def raw_unary(target: str, method: str, payload: bytes, **kwargs: Any) -> bytes:
    """Send ``payload`` bytes as the request of ``method``, unparsed; return the raw response."""
    with grpc.insecure_channel(target) as channel:
        return channel.unary_unary(method)(payload, timeout=10, **kwargs)


def score_pb(target: str, request: pb.ScoreRequest, **kwargs: Any) -> pb.ScoreResponse:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.ScoringServiceStub(channel).Score(request, timeout=10, **kwargs)


def pairs_pb(*pairs: tuple[str, str]) -> list[pb.Pair]:
    return [pb.Pair(id=f"p{i}", prompt=x, response=y) for i, (x, y) in enumerate(pairs)]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# --- limits ------------------------------------------------------------------------------


def test_limits_are_enforced_with_messages_naming_limit_and_value(
    start_server: Callable[..., ServerThread],
) -> None:
    st_ = start_server(
        FakeEngine(max_context=64), max_pairs_per_request=4, max_text_chars=30, max_item_tokens=20
    )
    with Raw(st_.target) as client:
        info = client.info()
        assert (info.max_pairs_per_request, info.max_text_chars, info.max_item_tokens) == (4, 30, 20)

        with pytest.raises(grpc.RpcError) as too_many:
            client.score([("x", "y")] * 5)
        assert too_many.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "5 pairs" in too_many.value.details() and "at most 4" in too_many.value.details()

        long_text, many_tokens, fine = (
            Pair("a" * 31, "", id="long"),
            Pair("b" * 12, "c" * 12, id="tokens"),  # 25 tokens: within the context, over 20
            Pair("ok", "!", id="fine"),
        )
        got = client.score([long_text, many_tokens, fine])
        assert [r.id for r in got] == ["long", "tokens", "fine"]
        assert isinstance(got[0], ItemError) and got[0].code is ItemErrorCode.INVALID_ARGUMENT
        assert "prompt has 31 characters" in got[0].message and "at most 30" in got[0].message
        assert isinstance(got[1], ItemError) and got[1].code is ItemErrorCode.INVALID_ARGUMENT
        assert "25 tokens" in got[1].message and "at most 20 tokens" in got[1].message
        assert got[2] == expected_score(fine)
        assert client.score([]) == []  # an empty request is answered, empty

        # In a stream, a too-large message becomes item errors and the stream goes on.
        responses = client.stream([[("x", "y")] * 5, [("a", "b")]])
        assert [r.code for r in responses[0]] == [ItemErrorCode.INVALID_ARGUMENT] * 5
        assert "at most 4" in responses[0][0].message
        assert responses[1] == [expected_score(Pair("a", "b"))]


def test_max_item_tokens_is_capped_at_the_model_context(
    start_server: Callable[..., ServerThread],
) -> None:
    st_ = start_server(FakeEngine(max_context=64), max_item_tokens=1000, max_queue_tokens=10)
    with Raw(st_.target) as client:
        info = client.info()
    assert info.max_item_tokens == 64
    assert info.max_queue_tokens == 64  # raised so that one maximal pair fits


def test_an_oversized_message_is_refused_and_the_server_keeps_serving(
    start_server: Callable[..., ServerThread],
) -> None:
    st_ = start_server(FakeEngine(), max_message_bytes=64 * 1024)
    big = pb.ScoreRequest(pairs=pairs_pb(("x" * 100_000, "y")))
    options = [("grpc.max_send_message_length", 1 << 22)]
    with grpc.insecure_channel(st_.target, options=options) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ScoringServiceStub(channel).Score(big, timeout=10)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert health(st_.target) == "SERVING"
    assert len(score_pb(st_.target, pb.ScoreRequest(pairs=pairs_pb(("a", "b")))).results) == 1


# --- malformed bytes ---------------------------------------------------------------------------

MALFORMED = [
    b"\x0a\xff\xff\xff\xff\x0f",  # pairs: a length far past the end
    b"\x0a\x05\x12\x01\xff\x1a\x00",  # pairs[0].prompt: invalid UTF-8
    b"\x0f",  # field 1 with wire type 7, which does not exist
    b"\x0a\x80",  # a truncated varint
    b"\x0a\x02" * 40 + b"\x0a\x00",  # nested length prefixes that do not add up
]


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ServerThread]:
    """One fake-engine server shared by the malformed-input tests of this module."""
    st_ = ServerThread(FakeEngine(max_context=64), max_text_chars=200).start()
    yield st_
    st_.stop()


@pytest.mark.parametrize("payload", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bytes_are_invalid_argument_and_do_not_hurt_the_server(
    fake_server: ServerThread, payload: bytes
) -> None:
    target = fake_server.target
    for method in (SCORE, MODEL_INFO) if payload == MALFORMED[0] else (SCORE,):
        with pytest.raises(grpc.RpcError) as info:
            raw_unary(target, method, payload)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "not a valid pairscore.v1." in info.value.details()
    assert health(target) == "SERVING"
    assert len(score_pb(target, pb.ScoreRequest(pairs=pairs_pb(("a", "b")))).results) == 1


def test_a_malformed_stream_message_ends_the_stream_after_answering_the_earlier_ones(
    fake_server: ServerThread,
) -> None:
    good = pb.ScoreRequest(pairs=pairs_pb(("a", "b"))).SerializeToString()
    with grpc.insecure_channel(fake_server.target) as channel:
        call = channel.stream_stream(SCORE_STREAM)(iter([good, MALFORMED[1], good]), timeout=10)
        answers = []
        with pytest.raises(grpc.RpcError) as info:
            for raw in call:
                answers.append(pb.ScoreResponse.FromString(raw))
    assert len(answers) == 1 and answers[0].results[0].HasField("scores")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert health(fake_server.target) == "SERVING"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.binary(max_size=200))
def test_random_bytes_never_crash_the_server(fake_server: ServerThread, payload: bytes) -> None:
    try:
        parsed: pb.ScoreRequest | None = pb.ScoreRequest.FromString(payload)
    except Exception:
        parsed = None
    try:
        raw = raw_unary(fake_server.target, SCORE, payload)
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        if parsed is not None:  # it parsed, but holds e.g. an unknown enum value
            assert "invalid request" in exc.details(), exc.details()
        return
    assert parsed is not None
    assert len(pb.ScoreResponse.FromString(raw).results) == len(parsed.pairs)


def test_the_server_answers_health_after_the_byte_fuzzing(fake_server: ServerThread) -> None:
    assert health(fake_server.target) == "SERVING"
    assert health(fake_server.target, "pairscore.v1.ScoringService") == "SERVING"


# --- hostile text, scored or refused deliberately ------------------------------------------------

HOSTILE = {
    "control characters": "tab\tNUL\x00bell\x07esc\x1b[31mred\x1b[0m del\x7f c1\x85\x9b",
    "RTL and bidi marks": "\u202eevil\u202c \u200fمرحبا\u200e שלום \u2066iso\u2069",
    "zero-width joiners": "👩\u200d👩\u200d👧 a\u200bb\u200cc\u2060d",
    "BOM": "\ufeffstarts with a BOM \ufeff",
    "special-token strings": "<|endoftext|><s></s><|im_start|>user<|im_end|>[INST]<unk><pad>",
    "noncharacters": "\ufffe\uffff\U0010ffff\U000e0001",
    "combining marks": "e" + "\u0301" * 50,
    "emoji": "😀" * 20,
}


@pytest.fixture(scope="module")
def tiny_server(tiny_engine: Any) -> Iterator[ServerThread]:
    """One server on the tiny real GPT-2 engine, shared by this module's text tests."""
    st_ = ServerThread(tiny_engine).start()
    yield st_
    st_.stop()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family_server(request: pytest.FixtureRequest) -> Iterator[tuple[ServerThread, set[int]]]:
    """A server on each tiny family's real engine, and the tokenizer's special token ids."""
    from harness.models import make_engine

    model, tokenizer = request.getfixturevalue(f"{request.param}_family")
    st_ = ServerThread(make_engine(model, tokenizer)).start()
    yield st_, set(tokenizer.all_special_ids)
    st_.stop()


def test_hostile_text_is_scored_as_plain_text(
    family_server: tuple[ServerThread, set[int]],
) -> None:
    server, special_ids = family_server
    pairs = [Pair(text, text, id=name) for name, text in HOSTILE.items()]
    with Raw(server.target) as client:
        got = client.score(pairs, return_tokens=True)
        info = client.info()
    assert info.prefix_token_id in special_ids
    for pair, result in zip(pairs, got, strict=True):
        assert isinstance(result, PairScore), (pair.id, result)
        assert result.id == pair.id
        assert result.prompt_tokens > 0 and result.response_tokens > 0
        assert result.joint_logprob == pytest.approx(result.prompt_logprob + result.conditional_logprob)
        # Special-token strings in user text are plain text: never a special token.
        assert not {t.token_id for t in result.tokens} & special_ids, pair.id
        for t in result.tokens:  # prompt and response are the same text here
            assert 0 <= t.char_start <= t.char_end <= len(pair.prompt)


def test_special_token_string_costs_several_tokens_not_one(tiny_server: ServerThread) -> None:
    with Raw(tiny_server.target) as client:
        [got] = client.score([Pair("<|endoftext|>", "")], return_tokens=True)
    assert isinstance(got, PairScore)
    assert got.prompt_tokens > 1  # "<", "|", "endoftext", ... not the single special id 0


def test_huge_texts_are_refused_deliberately(tiny_server: ServerThread) -> None:
    one_mb_of_emoji = "😀" * (1024 * 1024 // 4)  # 1 MiB of UTF-8, 262144 code points
    with Raw(tiny_server.target) as client:
        got = client.score(
            [
                Pair(one_mb_of_emoji, "", id="1MiB"),
                Pair("", "😀" * 5000, id="long"),
                Pair("fine", "", id="fine"),
            ]
        )
    assert isinstance(got[0], ItemError) and got[0].code is ItemErrorCode.INVALID_ARGUMENT
    assert "262144 characters" in got[0].message and "max_text_chars" in got[0].message
    assert isinstance(got[1], ItemError)
    assert got[1].code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert isinstance(got[2], PairScore)


_PIECE = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=8),  # every code point but surrogates
    st.sampled_from(["<|endoftext|>", "<s>", "</s>", "\u200d", "\u202e", "\ufeff", "\x00", " "]),
)
_TEXT = st.lists(_PIECE, max_size=8).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(st.tuples(_TEXT, _TEXT), max_size=6),
    joint=st.booleans(),
    tokens=st.booleans(),
)
def test_fuzzed_requests_keep_the_score_invariants(
    tiny_server: ServerThread, pairs: list[tuple[str, str]], joint: bool, tokens: bool
) -> None:
    request = pb.ScoreRequest(
        pairs=pairs_pb(*pairs),
        options=pb.ScoreOptions(
            tokenization=pb.TOKENIZATION_MODE_JOINT if joint else pb.TOKENIZATION_MODE_SEPARATE,
            return_tokens=tokens,
        ),
    )
    response = score_pb(tiny_server.target, request)
    assert [r.id for r in response.results] == [p.id for p in request.pairs]
    assert [r.index for r in response.results] == list(range(len(pairs)))
    for (prompt, resp), result in zip(pairs, response.results, strict=True):
        if result.HasField("error"):  # a clear refusal: a known code and a message
            assert result.error.code in (
                pb.ITEM_ERROR_CODE_INVALID_ARGUMENT,
                pb.ITEM_ERROR_CODE_CONTEXT_LENGTH_EXCEEDED,
            )
            assert result.error.message
            continue
        s = result.scores
        assert s.prompt_logprob <= 1e-6 and s.conditional_logprob <= 1e-6
        assert s.joint_logprob == pytest.approx(s.prompt_logprob + s.conditional_logprob)
        assert (s.prompt_tokens == 0) == (prompt == "") or joint
        assert s.prompt_tokens >= 0 and s.response_tokens >= 0
        if resp == "":
            assert s.response_tokens == 0 and s.conditional_logprob == 0
        if tokens:
            assert len(s.tokens) == s.prompt_tokens + s.response_tokens
            assert sum(t.logprob for t in s.tokens) == pytest.approx(s.joint_logprob, abs=1e-3)
            for t in s.tokens:
                side_text = prompt if t.side == pb.SIDE_PROMPT else resp
                assert 0 <= t.char_start <= t.char_end <= len(side_text)
                assert t.token_id != 0  # never the special <|endoftext|>
        else:
            assert not s.tokens
    assert health(tiny_server.target) == "SERVING"


# --- overload ----------------------------------------------------------------------------------


def _fill(st_: ServerThread, engine: FakeEngine, n_queued: int) -> list[threading.Thread]:
    """Occupy the model with one call and queue ``n_queued`` more (one 3-token pair each)."""
    busy = pb.ScoreRequest(pairs=pairs_pb(("b", "!")))
    threads = [threading.Thread(target=score_pb, args=(st_.target, busy))]
    threads[0].start()
    batcher = st_.server.batcher
    assert batcher is not None
    wait_until(lambda: batcher.busy_seconds > 0)  # in the model (or at its score_gate)
    for i in range(n_queued):
        threads.append(
            threading.Thread(
                target=score_pb, args=(st_.target, pb.ScoreRequest(pairs=pairs_pb((f"{i}", "!"))))
            )
        )
        threads[-1].start()
    wait_until(lambda: batcher.queued_pairs == n_queued)
    return threads


def test_a_full_queue_answers_resource_exhausted_at_once_with_a_retry_hint(
    start_server: Callable[..., ServerThread],
) -> None:
    gate = threading.Event()  # the model holds its first pair until both refusals came back
    engine = FakeEngine(score_gate=gate)
    st_ = start_server(engine, max_batch_pairs=1, max_queue_tokens=9, max_item_tokens=8, max_wait_ms=0)
    # 3 x 3 tokens queued: a 4-token request is refused until two of them ran.
    try:
        threads = _fill(st_, engine, n_queued=3)
        with grpc.insecure_channel(st_.target) as channel:
            call = pb_grpc.ScoringServiceStub(channel).Score.with_call
            with pytest.raises(grpc.RpcError) as info:
                call(pb.ScoreRequest(pairs=pairs_pb(("xy", "!"))), timeout=10)  # 4 tokens
        # In a stream, the same overload gives item errors and the stream goes on.
        with Raw(st_.target) as client:
            [[rejected]] = client.stream([[("xy", "!")]])
        # At once: both came back while the model still held its first pair and the queue
        # was as full as before (a wall-clock bound, < 0.3 s, stood here; load broke it).
        assert not engine.batches and st_.server.batcher.queued_pairs == 3
    finally:
        gate.set()
    err = info.value
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "9 of 9 tokens" in err.details() and "retry in about" in err.details()
    pushback = dict(err.trailing_metadata())[RETRY_PUSHBACK_KEY]
    assert 50 <= int(pushback) <= 30_000
    assert isinstance(rejected, ItemError)
    assert rejected.code is ItemErrorCode.RESOURCE_EXHAUSTED and "retry in" in rejected.message
    for t in threads:
        t.join(timeout=10)
    samples = metric_samples(st_.metrics_text())
    assert samples[("pairscore_rejected_pairs_total", (("reason", "queue_full"),))] == 2
    exhausted = ("pairscore_requests_total", (("code", "RESOURCE_EXHAUSTED"), ("method", "Score")))
    assert samples[exhausted] == 1
    assert ("pairscore_queue_tokens", ()) in samples
    with Raw(st_.target) as client:  # once drained, the same request is admitted
        assert client.score([("xy", "!")]) == [expected_score(Pair("xy", "!"))]


# --- shutdown ---------------------------------------------------------------------------------


def test_health_watchers_see_not_serving_as_soon_as_shutdown_starts(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(forward_delay_s=1.0)
    st_ = start_server(engine)
    with grpc.insecure_channel(st_.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        updates = iter(watch)
        assert next(updates).status == health_pb2.HealthCheckResponse.SERVING
        slow = pb_grpc.ScoringServiceStub(channel).Score.future(
            pb.ScoreRequest(pairs=pairs_pb(("slow", "!"))), timeout=10
        )
        wait_until(lambda: len(engine.batches) == 1)
        stopping = st_.submit(st_.server.stop(grace=60))
        assert next(updates).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert not slow.done()  # NOT_SERVING came while the in-flight call still ran
        assert list(updates) == []  # then the Watch stream ended, so it holds up nothing
        assert slow.result(timeout=10).results[0].HasField("scores")
        # Not the 60 s grace: nothing was left waiting, so stop() ends with the call (~1 s).
        # Half the grace is the bound, which load cannot reach (it was 5 s of a 10 s grace).
        stopping.result(timeout=30)


# --- deadlines and cancellation ----------------------------------------------------------------


def test_cancelling_a_call_mid_batch_leaves_its_batch_mates_their_results(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(forward_delay_s=0.5)
    st_ = start_server(engine, max_wait_ms=150)
    with grpc.insecure_channel(st_.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        leaver = stub.Score.future(pb.ScoreRequest(pairs=pairs_pb(("leaver", "!"))), timeout=10)
        stayer = stub.Score.future(pb.ScoreRequest(pairs=pairs_pb(("stayer", "!"))), timeout=10)
        wait_until(lambda: len(engine.batches) == 1)  # both are in one forward pass now
        assert sorted(engine.batches[0]) == ["leaver", "stayer"]  # arrival order may vary
        leaver.cancel()
        response = stayer.result(timeout=10)
    assert response.results[0].scores.prompt_tokens == len("stayer")
    assert leaver.cancelled()
    assert health(st_.target) == "SERVING"


def test_cancelled_and_expired_queued_work_never_reaches_the_model_and_is_counted(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(forward_delay_s=0.5)
    st_ = start_server(engine, max_batch_pairs=1)
    with grpc.insecure_channel(st_.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        busy = stub.Score.future(pb.ScoreRequest(pairs=pairs_pb(("busy", "!"))), timeout=10)
        wait_until(lambda: len(engine.batches) == 1)
        cancelled = stub.Score.future(pb.ScoreRequest(pairs=pairs_pb(("c1", "!"), ("c2", "!"))), timeout=10)
        expiring = stub.Score.future(pb.ScoreRequest(pairs=pairs_pb(("late", "!"))), timeout=0.2)
        batcher = st_.server.batcher
        assert batcher is not None
        wait_until(lambda: batcher.queued_pairs == 3)
        cancelled.cancel()
        with pytest.raises(grpc.RpcError) as info:
            expiring.result(timeout=10)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        busy.result(timeout=10)
    wait_until(lambda: batcher.queued_pairs == 0)
    assert engine.batches == [("busy",)]
    samples = metric_samples(st_.metrics_text())
    dropped = {
        dict(labels)["reason"]: value
        for (name, labels), value in samples.items()
        if name == "pairscore_dropped_pairs_total"
    }
    assert dropped == {"cancelled": 2.0, "deadline": 1.0}


# --- out of memory ----------------------------------------------------------------------------


def test_injected_oom_splits_batches_and_fails_only_what_cannot_fit(
    start_server: Callable[..., ServerThread],
) -> None:
    engine = FakeEngine(oom_above_tokens=24, forward_delay_s=0.05)
    st_ = start_server(engine, max_wait_ms=100)
    pairs = [Pair(f"p{i}", "!!", id=f"p{i}") for i in range(12)]  # 5 tokens each
    huge = Pair("h" * 30, "", id="huge")  # 31 tokens: does not fit even alone
    results: list[Any] = [None] * 4

    def call(k: int) -> None:
        with Raw(st_.target, timeout=20) as client:
            chunk = pairs[3 * k : 3 * k + 3] + ([huge] if k == 0 else [])
            results[k] = client.score(chunk)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    flat = [r for chunk in results for r in chunk]
    scored = [r for r in flat if isinstance(r, PairScore)]
    assert sorted(r.id for r in scored) == sorted(p.id for p in pairs)
    assert all(r == expected_score(p) for p in pairs for r in scored if r.id == p.id)
    [failed] = [r for r in flat if isinstance(r, ItemError)]
    assert failed.id == "huge" and failed.code is ItemErrorCode.RESOURCE_EXHAUSTED
    assert "out of memory" in failed.message and "31 tokens" in failed.message
    samples = metric_samples(st_.metrics_text())
    assert samples[("pairscore_oom_splits_total", ())] >= 1
    assert samples[("pairscore_pairs_total", (("outcome", "resource_exhausted"),))] == 1
    assert health(st_.target) == "SERVING"


# --- a stuck or crashed model worker -----------------------------------------------------------


def test_a_stuck_worker_turns_health_not_serving_and_fails_callers_instead_of_hanging(
    start_server: Callable[..., ServerThread],
) -> None:
    gate = threading.Event()
    engine = FakeEngine(score_gate=gate)
    try:
        st_ = start_server(engine, forward_timeout_s=0.3, max_batch_pairs=1)
        with Raw(st_.target) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.score([("stuck", "!")])
            # UNAVAILABLE from the watchdog, not DEADLINE_EXCEEDED at the call's own 10 s
            # deadline: the caller was failed, not left hanging (a wall-clock bound, < 3 s,
            # stood here; the gate holds the worker for 60 s).
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "stuck" in info.value.details()
            assert health(st_.target) == "NOT_SERVING"
            assert health(st_.target, "pairscore.v1.ScoringService") == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as refused:
                client.score([("refused", "!")])
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            assert "has not answered" in refused.value.details()
            assert "pairscore_serving 0.0" in st_.metrics_text()
            gate.set()  # the worker answers again: the server recovers
            wait_until(lambda: health(st_.target) == "SERVING")
            assert client.score([("again", "!")]) == [expected_score(Pair("again", "!"))]
    finally:
        gate.set()


class _CrashableEngine:
    """A FakeEngine whose batch budget lookup blows up once armed: the batching loop dies."""

    def __init__(self) -> None:
        self._inner = FakeEngine()
        self.armed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def max_call_tokens(self) -> int:
        if self.armed:
            raise RuntimeError("injected bug in the batching loop")
        return self._inner.max_call_tokens


def test_a_crashed_batching_loop_turns_health_not_serving_and_callers_get_unavailable(
    start_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    engine = _CrashableEngine()
    st_ = start_server(engine)
    engine.armed = True
    with Raw(st_.target) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.score([("x", "y")])
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "the batching loop crashed" in info.value.details()
        wait_until(lambda: health(st_.target) == "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as again:
            client.score([("x", "y")])
        assert again.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "the batching loop crashed" in caplog.text


# --- what leaves the server ----------------------------------------------------------------


def test_no_user_text_in_info_logs_or_metrics(
    start_server: Callable[..., ServerThread], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    engine = FakeEngine(oom_above_tokens=40, max_context=64)
    st_ = start_server(engine, max_text_chars=50, max_wait_ms=50)
    with Raw(st_.target) as client:
        client.score([Pair(SECRET, SECRET, id=SECRET)])
        client.score([Pair(SECRET * 3, "", id="too-long-for-the-limit")])
        client.score([Pair(SECRET, SECRET + "x" * 5, id="oom-alone")])  # 56 tokens > 40
        with pytest.raises(grpc.RpcError):
            client.score([("x", "y")] * 2000)  # over max_pairs_per_request
        with pytest.raises(grpc.RpcError):
            client.score([Pair("FAIL", SECRET)])  # a failing batch, logged at ERROR
    assert "a batch of 1 pairs failed" in caplog.text  # the logs did capture the server
    assert SECRET not in caplog.text
    assert SECRET not in st_.metrics_text()


def test_max_connection_age_reaches_grpc_and_clients_reconnect_transparently(
    start_server: Callable[..., ServerThread],
) -> None:
    config = ServerConfig(max_connection_age_s=0.3, max_connection_age_grace_s=0.2)
    options = dict(RunningServer(config)._grpc_options())
    assert options["grpc.max_connection_age_ms"] == 300
    assert options["grpc.max_connection_age_grace_ms"] == 200
    assert "grpc.max_connection_age_ms" not in dict(RunningServer(ServerConfig())._grpc_options())

    st_ = start_server(FakeEngine(), max_connection_age_s=0.3, max_connection_age_grace_s=0.2)
    with Raw(st_.target) as client:
        for _ in range(4):  # spans several connection lifetimes
            assert client.score([("a", "b")]) == [expected_score(Pair("a", "b"))]
            time.sleep(0.25)
