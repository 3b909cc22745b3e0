"""The sync and asyncio clients against real servers on 127.0.0.1.

The real pairscore server runs with the fake engine (fast, exact scores) or
a real engine on a tiny GPT-2; a stub server stands in where the real one
does not (yet) do something the client must handle: TLS with client
certificates, checking a bearer token, refusing items for overload.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pairscore import errors
from pairscore.aio import AsyncScoringClient
from pairscore.channel import RetryPolicy, TlsConfig
from pairscore.client import ScoringClient
from pairscore.types import ItemError, ItemErrorCode, Pair, PairScore, ScoreOptions

from harness.fake_engine import FakeEngine, expected_score
from harness.servers import ServerThread, StubServer, StubServicer, free_port

#: Progress deadline of the stalled-stream test: the hung stream is cancelled after it, and the
#: reopened one must answer each batch within it (the stub answers in milliseconds; 2 s leaves
#: room for a loaded machine, where 0.5 s could cancel a working stream too).
STALL_S = 2.0
FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05, stream_reconnect_timeout_s=20)


@pytest.fixture
def servers() -> Iterator[list[ServerThread]]:
    """Servers started by a test; all stopped at the end."""
    started: list[ServerThread] = []
    yield started
    for st in started:
        st.stop()


def start(servers: list[ServerThread], engine: Any, **config: Any) -> ServerThread:
    st = ServerThread(engine, **config).start()
    servers.append(st)
    return st


@pytest.fixture(params=["fake", "tiny"])
def client_engine(request: pytest.FixtureRequest) -> Any:
    """The fake engine, or a real ScoringEngine on a tiny random GPT-2."""
    if request.param == "fake":
        return FakeEngine(max_context=64)
    return request.getfixturevalue("tiny_engine")


def mixed_pairs(engine: Any, n: int) -> list[Pair]:
    """Pairs of very different lengths, every 7th too long for the context."""
    too_long = engine.info.max_context_tokens
    out = []
    for i in range(n):
        if i % 7 == 3:
            out.append(Pair("a " * too_long, " b" * too_long, id=f"long-{i}"))
        else:
            out.append(Pair("word " * (i % 5), " reply" * (1 + (i * 3) % 9), id=f"p{i}"))
    return out


def reference(engine: Any, pairs: list[Pair]) -> list[Any]:
    """What the engine gives for each pair alone, in-process."""
    return [
        p if isinstance(p, ItemError) else engine.score([p]).scores[0]
        for p in engine.prepare(pairs, ScoreOptions())
    ]


def assert_matches(got: list[Any], want: list[Any]) -> None:
    assert [g.id for g in got] == [w.id for w in want]
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)
        if isinstance(w, ItemError):
            assert (g.code, g.message) == (w.code, w.message)
        else:
            assert (g.prompt_tokens, g.response_tokens) == (w.prompt_tokens, w.response_tokens)
            assert g.conditional_logprob == pytest.approx(w.conditional_logprob, abs=1e-4)
            assert g.joint_logprob == pytest.approx(w.joint_logprob, abs=1e-4)


# --- options: one ScoreOptions or keywords, on every scoring method --------------------------


def _tokens(outcomes: Any) -> list[Any]:
    return [o.tokens for o in outcomes]


def test_every_scoring_method_takes_options_or_keywords_not_both(servers: list[ServerThread]) -> None:
    st = start(servers, FakeEngine(max_context=64))
    pairs = [Pair(f"prompt {i}", f" response {i}", id=str(i)) for i in range(5)]
    options = ScoreOptions(return_tokens=True)
    with ScoringClient(st.target, timeout=30) as client:
        by_keyword = client.score(pairs, return_tokens=True)
        assert all(o.tokens for o in by_keyword)  # the option reached the server
        forms = {
            "score": client.score(pairs, options=options),
            "score_iter": list(client.score_iter(pairs, batch_size=2, options=options)),
            "score_stream": [
                o for b in client.score_stream([pairs[:2], pairs[2:]], options=options) for o in b
            ],
            "score_responses": client.score_responses("prompt 0", [" response 0"], options=options),
        }
        for name, got in forms.items():
            want = by_keyword[:1] if name == "score_responses" else by_keyword
            assert _tokens(got) == _tokens(want), name
        calls = {
            "score": lambda **kw: client.score(pairs, **kw),
            "score_iter": lambda **kw: list(client.score_iter(pairs, **kw)),
            "score_stream": lambda **kw: list(client.score_stream([pairs], **kw)),
            "score_candidates": lambda **kw: client.score_candidates([], **kw),
            "score_responses": lambda **kw: client.score_responses("p", ["r"], **kw),
        }
        for call in calls.values():
            with pytest.raises(ValueError, match=r"not both \(got options and greedy=True\)"):
                call(options=options, greedy=True)
            with pytest.raises(TypeError, match="unknown option 'tokenisation'"):
                call(tokenisation="joint")
            with pytest.raises(ValueError, match="top_k must be a whole number >= 0, got -1"):
                call(options=ScoreOptions(top_k=-1))

    async def body() -> list[Any]:
        async with AsyncScoringClient(st.target, timeout=30) as aclient:
            got = [
                await aclient.score(pairs, options=options),
                [o async for o in aclient.score_iter(pairs, batch_size=2, options=options)],
            ]
            with pytest.raises(ValueError, match="not both"):
                await aclient.score(pairs, options=options, top_k=3)
            with pytest.raises(ValueError, match="not both"):
                aclient.score_iter(pairs, options=options, truncation="left")
            return got

    for got in asyncio.run(asyncio.wait_for(body(), 60)):
        assert _tokens(got) == _tokens(by_keyword)


# --- ordering and per-item errors --------------------------------------------------------


def test_score_iter_yields_input_order_with_mixed_lengths_and_item_errors(
    client_engine: Any, servers: list[ServerThread]
) -> None:
    st = start(servers, client_engine)
    pairs = mixed_pairs(client_engine, 40)
    with ScoringClient(st.target, timeout=30) as client:
        got = list(client.score_iter(iter(pairs), batch_size=3, streams=2))
        assert_matches(client.score(pairs), reference(client_engine, pairs))
    assert_matches(got, reference(client_engine, pairs))
    assert sum(isinstance(g, ItemError) for g in got) == 6
    assert all(g.code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED for g in got if isinstance(g, ItemError))


def test_async_client_gives_what_the_sync_client_gives(
    client_engine: Any, servers: list[ServerThread]
) -> None:
    st = start(servers, client_engine)
    pairs = mixed_pairs(client_engine, 25)

    async def pairs_async() -> Any:
        for p in pairs:
            yield p

    async def body() -> tuple[Any, ...]:
        async with AsyncScoringClient(st.target, timeout=30) as client:
            streamed = [r async for r in client.score_iter(pairs_async(), batch_size=4, streams=2)]
            from_list = [r async for r in client.score_iter(pairs, batch_size=5)]
            return (
                await client.score(pairs),
                streamed,
                from_list,
                await client.model_info(),
                await client.health(),
            )

    unary, streamed, from_list, info, health = asyncio.run(asyncio.wait_for(body(), 60))
    want = reference(client_engine, pairs)
    for got in (unary, streamed, from_list):
        assert_matches(got, want)
    with ScoringClient(st.target, timeout=30) as client:
        assert info == client.model_info()
    assert info.model_name == client_engine.info.model_name
    assert health == "SERVING"


def test_leaving_score_iter_early_cancels_the_streams(servers: list[ServerThread]) -> None:
    st = start(servers, FakeEngine())
    endless = (Pair(f"p{i}", "r") for i in range(10**9))
    with ScoringClient(st.target, timeout=10) as client:
        results = client.score_iter(endless, batch_size=8, streams=2)
        first = [next(results) for _ in range(50)]
        results.close()  # what a `break` does
        assert [r.prompt_tokens for r in first] == [len(f"p{i}") for i in range(50)]
        assert client.score([("still", "fine")]) == [expected_score(Pair("still", "fine"))]


def test_an_error_raised_by_the_input_ends_score_iter_with_that_error(servers: list[ServerThread]) -> None:
    st = start(servers, FakeEngine())

    def broken() -> Iterator[tuple[str, str]]:
        yield ("a", "b")
        raise OSError("disk went away")

    with ScoringClient(st.target, timeout=10) as client, pytest.raises(OSError, match="disk went away"):
        list(client.score_iter(broken()))
    with ScoringClient(st.target, timeout=10) as client, pytest.raises(TypeError, match="tuple"):
        list(client.score_iter(["not a pair"]))  # type: ignore[list-item]


# --- restarts and retries ----------------------------------------------------------------------


def test_score_iter_survives_a_server_restart_and_answers_every_pair_once(
    servers: list[ServerThread],
) -> None:
    first = FakeEngine(forward_delay_s=0.005)
    st = start(servers, first)
    n = 3000
    pairs = (Pair(f"q{i}", "r" * (i % 5), id=str(i)) for i in range(n))
    second = FakeEngine()
    got: list[Any] = []
    restarter: threading.Thread | None = None
    with ScoringClient(st.target, timeout=20, retry=FAST_RETRY) as client:
        for outcome in client.score_iter(pairs, batch_size=16, streams=2):
            got.append(outcome)
            if len(got) == 500:
                st.stop()  # connections drop; in-flight batches are lost server-side
                st.engine = second

                def restart() -> None:
                    time.sleep(0.5)
                    st.start()

                restarter = threading.Thread(target=restart)
                restarter.start()
    assert restarter is not None
    restarter.join()
    assert [g.id for g in got] == [str(i) for i in range(n)]
    assert all(isinstance(g, PairScore) for g in got)
    assert first.batches and second.batches  # both servers did part of the work


def test_async_score_iter_survives_a_server_restart(servers: list[ServerThread]) -> None:
    st = start(servers, FakeEngine(forward_delay_s=0.005))
    n = 1500
    restarter = threading.Thread(target=lambda: (time.sleep(0.5), st.start()))

    async def body() -> list[Any]:
        got: list[Any] = []
        async with AsyncScoringClient(st.target, timeout=20, retry=FAST_RETRY) as client:
            pairs = (Pair(f"q{i}", "r", id=str(i)) for i in range(n))
            async for outcome in client.score_iter(pairs, batch_size=16, streams=2):
                got.append(outcome)
                if len(got) == 300:
                    st.stop()
                    st.engine = FakeEngine()
                    restarter.start()
        return got

    got = asyncio.run(asyncio.wait_for(body(), 120))
    restarter.join()
    assert [g.id for g in got] == [str(i) for i in range(n)]
    assert all(isinstance(g, PairScore) for g in got)
    assert st.engine.batches


def test_a_call_waits_for_a_restarted_server_when_wait_for_ready(servers: list[ServerThread]) -> None:
    st = start(servers, FakeEngine())
    with ScoringClient(st.target, timeout=20, wait_for_ready=True) as client:
        assert client.score([("a", "b")]) == [expected_score(Pair("a", "b"))]
        st.stop()
        threading.Timer(0.5, st.start).start()
        assert client.score([("c", "d")]) == [expected_score(Pair("c", "d"))]


def test_the_channel_retries_unavailable_and_overloaded_calls() -> None:
    calls: list[int] = []

    def flaky(context: grpc.ServicerContext) -> None:
        calls.append(1)
        if len(calls) <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    stub = StubServer(StubServicer(before=flaky))
    try:
        with ScoringClient(stub.target, timeout=20, retry=FAST_RETRY) as client:
            assert client.score([("a", "b")]) == [expected_score(Pair("a", "b"))]
        assert len(calls) == 3  # two retries, by gRPC's retryPolicy

        calls.clear()
        stub.servicer.before = lambda ctx: (
            calls.append(1),
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full"),
        )
        with ScoringClient(stub.target, timeout=20, retry=FAST_RETRY) as client:
            with pytest.raises(errors.OverloadedError, match="full") as info:
                client.score([("a", "b")])
        assert info.value.retryable
        assert len(calls) == FAST_RETRY.max_attempts
        calls.clear()
        with ScoringClient(stub.target, timeout=20, retry=None) as client:
            with pytest.raises(errors.OverloadedError):
                client.score([("a", "b")])
        assert len(calls) == 1
    finally:
        stub.stop()


def test_items_refused_for_overload_are_resent_until_scored() -> None:
    servicer = StubServicer(overload=lambda pair_id, attempt: int(pair_id) % 2 == 0 and attempt <= 2)
    stub = StubServer(servicer)
    try:
        pairs = [Pair(f"p{i}", "r", id=str(i)) for i in range(40)]
        with ScoringClient(stub.target, timeout=20, retry=FAST_RETRY) as client:
            got = list(client.score_iter(pairs, batch_size=8))
        assert got == [expected_score(p) for p in pairs]
        assert all(servicer.sightings[str(i)] == (3 if i % 2 == 0 else 1) for i in range(40))

        servicer.overload = lambda pair_id, attempt: pair_id == "7"  # never gets through
        with ScoringClient(stub.target, timeout=20, retry=FAST_RETRY) as client:
            got = list(client.score_iter(pairs, batch_size=8))
        assert isinstance(got[7], ItemError) and got[7].code is ItemErrorCode.RESOURCE_EXHAUSTED
        assert got[:7] + got[8:] == [expected_score(p) for p in pairs[:7] + pairs[8:]]
    finally:
        stub.stop()


# --- load balancing ---------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "both_busy"), [("round_robin", True), ("pick_first", False)])
def test_round_robin_spreads_streams_over_every_replica(
    servers: list[ServerThread], policy: str, both_busy: bool
) -> None:
    engines = [FakeEngine(forward_delay_s=0.002), FakeEngine(forward_delay_s=0.002)]
    replicas = [start(servers, e) for e in engines]
    target = "ipv4:" + ",".join(r.target for r in replicas)  # what DNS gives for a headless Service
    pairs = [Pair(f"x{i}", "y", id=str(i)) for i in range(400)]
    with ScoringClient(target, timeout=20, load_balancing=policy) as client:
        # round_robin picks only subchannels that are READY: streams opened while the
        # second one is still connecting all go to the first. Wait until the channel
        # has connected (unary calls until both replicas answered one, or 50 calls),
        # then count only the streams' batches.
        for _ in range(50):
            if all(e.batches for e in engines):
                break
            client.score([Pair("warm", " up")])
        for e in engines:
            e.batches.clear()
        got = list(client.score_iter(pairs, batch_size=10, streams=4))
    assert [g.id for g in got] == [p.id for p in pairs]
    busy = [bool(e.batches) for e in engines]
    assert busy == [True, True] if both_busy else sum(busy) == 1


# --- typed errors and deadlines ------------------------------------------------------------


def test_no_server_is_unavailable() -> None:
    with ScoringClient(f"127.0.0.1:{free_port()}", timeout=5, retry=None) as client:
        with pytest.raises(errors.UnavailableError):
            client.model_info()
        with pytest.raises(errors.UnavailableError):
            list(client.score_iter([("a", "b")]))


def test_deadlines_apply_per_call_and_per_stream_answer(servers: list[ServerThread]) -> None:
    st = start(servers, FakeEngine(forward_delay_s=1.0))
    quick_give_up = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02, stream_reconnect_timeout_s=0.5)
    with ScoringClient(st.target, timeout=30, retry=quick_give_up) as client:
        with pytest.raises(errors.DeadlineExceededError):
            client.score([("slow", "!")], timeout=0.2)
        with pytest.raises(errors.DeadlineExceededError, match="no answer on the stream"):
            list(client.score_iter([("slow", "!")], timeout=0.3))


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_stalled_stream_is_reopened_and_its_pairs_resent(flavour: str) -> None:
    """The first ScoreStream call hangs; the progress deadline cancels it and a new stream finishes."""
    hang = threading.Event()
    calls: list[int] = []

    class HangOnce(StubServicer):
        def ScoreStream(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
            calls.append(1)
            if len(calls) == 1:
                next(request_iterator)
                hang.wait(10)  # never answers; the client gives up on it
                return
            yield from super().ScoreStream(request_iterator, context)

    stub = StubServer(HangOnce())
    try:
        pairs = [Pair(f"p{i}", "r", id=str(i)) for i in range(20)]
        if flavour == "sync":
            with ScoringClient(stub.target, timeout=STALL_S, retry=FAST_RETRY) as client:
                got = list(client.score_iter(pairs, batch_size=4))
        else:

            async def body() -> list[Any]:
                async with AsyncScoringClient(stub.target, timeout=STALL_S, retry=FAST_RETRY) as client:
                    return [r async for r in client.score_iter(pairs, batch_size=4)]

            got = asyncio.run(asyncio.wait_for(body(), 30))
        assert got == [expected_score(p) for p in pairs]
        assert len(calls) == 2
    finally:
        hang.set()
        stub.stop()


# --- TLS and tokens ---------------------------------------------------------------------------


def _pki(tmp: Path) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, as PEM."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key() -> Any:
        return ec.generate_private_key(ec.SECP256R1())

    def cert(
        subject: str, public: Any, signer: Any, issuer: str, *, ca: bool = False, sans: Any = None
    ) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def pem(obj: Any) -> bytes:
        if hasattr(obj, "private_bytes"):
            return obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        return obj.public_bytes(serialization.Encoding.PEM)

    ca_key, server_key, client_key = key(), key(), key()
    ca = cert("test-ca", ca_key.public_key(), ca_key, "test-ca", ca=True)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = cert("pairscore", server_key.public_key(), ca_key, "test-ca", sans=sans)
    client = cert("pipeline", client_key.public_key(), ca_key, "test-ca")
    files = {
        "ca": pem(ca),
        "server_cert": pem(server),
        "server_key": pem(server_key),
        "client_cert": pem(client),
        "client_key": pem(client_key),
    }
    for name, data in files.items():
        (tmp / f"{name}.pem").write_bytes(data)
    return files


def test_mutual_tls_with_a_bearer_token_as_call_credentials(tmp_path: Path) -> None:
    pki = _pki(tmp_path)

    def require_token(context: grpc.ServicerContext) -> None:
        if dict(context.invocation_metadata()).get("authorization") != "Bearer s3cret":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    creds = grpc.ssl_server_credentials(
        [(pki["server_key"], pki["server_cert"])], root_certificates=pki["ca"], require_client_auth=True
    )
    stub = StubServer(StubServicer(before=require_token), server_credentials=creds)
    try:
        tls = TlsConfig(
            ca_cert=tmp_path / "ca.pem",
            client_cert=str(tmp_path / "client_cert.pem"),
            client_key=pki["client_key"],
        )
        with ScoringClient(stub.target, timeout=10, tls=tls, token="s3cret") as client:
            assert client.score([("a", "b")]) == [expected_score(Pair("a", "b"))]
            assert [r.id for r in client.score_iter([Pair("x", "y", id="7")])] == ["7"]
            assert client.model_info().model_name == "fake-model"
        with ScoringClient(stub.target, timeout=10, tls=tls, token="wrong", retry=None) as client:
            with pytest.raises(errors.UnauthenticatedError, match="wrong bearer token"):
                client.score([("a", "b")])
        without_client_cert = TlsConfig(ca_cert=pki["ca"])
        with ScoringClient(stub.target, timeout=5, tls=without_client_cert, retry=None) as client:
            with pytest.raises(errors.UnavailableError):
                client.score([("a", "b")])
    finally:
        stub.stop()


def test_a_token_on_a_plaintext_channel_rides_in_the_metadata() -> None:
    servicer = StubServicer()
    stub = StubServer(servicer)
    try:
        with ScoringClient(stub.target, timeout=10, token="t0k") as client:
            client.score([("a", "b")])
            list(client.score_iter([("a", "b")]))

        async def body() -> None:
            async with AsyncScoringClient(stub.target, timeout=10, token="t0k") as aclient:
                await aclient.score([("a", "b")])

        asyncio.run(body())
        assert [m.get("authorization") for m in servicer.seen_metadata] == ["Bearer t0k"] * 3
    finally:
        stub.stop()
