"""Client internals without a server: score_iter's bookkeeping, reconnect rule, channel config, errors."""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pairscore import errors
from pairscore._base import IterSettings, to_pair
from pairscore._reconnect import (
    CORE_WRITE_FAILURE,
    ITEM_RETRY_ATTEMPTS,
    Reconnector,
    item_retry_delays,
    lane_error,
)
from pairscore._sequencer import Lane, Sequencer
from pairscore.channel import ChannelSettings, RetryPolicy, TlsConfig
from pairscore.types import ItemError, ItemErrorCode, Pair, PairScore

# --- Sequencer -----------------------------------------------------------------------------


def _score(pair: Pair) -> PairScore:
    return PairScore(-1.0, -0.5, -0.5, 1, 1, id=pair.id)


def _pairs(n: int, start: int = 0) -> list[Pair]:
    return [Pair("p", "r", id=str(i)) for i in range(start, start + n)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_results_come_out_in_input_order_whatever_order_lanes_answer() -> None:
    seq = Sequencer(batch_size=2, max_in_flight=8)
    a, b = Lane(), Lane()
    first = seq.end_read(_pairs(2, 0), a)
    seq.begin_read()
    second = seq.end_read(_pairs(2, 2), b)
    assert first is not None and second is not None
    seq.answered(b, [_score(p) for p in second.pairs])
    assert seq.pop_ready() == []  # batch 0 is still out
    seq.answered(a, [_score(p) for p in first.pairs])
    assert [r.id for r in seq.pop_ready()] == ["0", "1", "2", "3"]
    seq.begin_read()
    assert seq.end_read([], a) is None
    assert seq.finished


def test_in_flight_is_bounded_until_the_consumer_takes_results() -> None:
    seq = Sequencer(batch_size=4, max_in_flight=8)
    lane = Lane()
    for start in (0, 4):
        assert seq.wants_input()
        seq.begin_read()
        seq.end_read(_pairs(4, start), lane)
    assert not seq.wants_input()  # 8 pairs in flight
    for batch in list(lane.outstanding):
        seq.answered(lane, [_score(p) for p in batch.pairs])
    assert not seq.wants_input()  # answered but not yet taken
    assert len(seq.pop_ready()) == 8
    assert seq.wants_input()


def test_a_broken_lane_requeues_its_batches_and_they_are_resent_first_in_order() -> None:
    seq = Sequencer(batch_size=1, max_in_flight=10)
    dead, live = Lane(), Lane()
    for i in range(3):
        seq.begin_read()
        seq.end_read(_pairs(1, i), dead)
    assert seq.lane_broken(dead) == 3
    assert dead.dead and not dead.outstanding
    assert not seq.wants_input()  # resend before reading more
    resent = [seq.take_retry(live) for _ in range(3)]
    assert [b.seq for b in resent if b] == [0, 1, 2]
    assert seq.take_retry(live) is None
    for batch in resent:
        assert batch is not None
        seq.answered(live, [_score(p) for p in batch.pairs])
    assert [r.id for r in seq.pop_ready()] == ["0", "1", "2"]


def test_a_batch_read_for_a_lane_that_died_meanwhile_goes_to_the_retry_queue() -> None:
    seq = Sequencer(batch_size=2, max_in_flight=10)
    lane = Lane()
    seq.begin_read()
    seq.lane_broken(lane)
    assert seq.end_read(_pairs(2), lane) is None
    other = Lane()
    batch = seq.take_retry(other)
    assert batch is not None and [p.id for p in batch.pairs] == ["0", "1"]


def test_overloaded_items_are_resent_after_a_delay_and_keep_their_place() -> None:
    clock = Clock()
    seq = Sequencer(batch_size=3, max_in_flight=10, item_retry_delay=lambda n: 1.0, clock=clock)
    lane = Lane()
    seq.begin_read()
    batch = seq.end_read(_pairs(3), lane)
    assert batch is not None
    busy = ItemError(ItemErrorCode.RESOURCE_EXHAUSTED, "busy", id="1")
    seq.answered(lane, [_score(batch.pairs[0]), busy, _score(batch.pairs[2])])
    assert seq.pop_ready() == []
    assert seq.take_retry(lane) is None  # not due yet
    assert seq.next_retry_in() == pytest.approx(1.0)
    clock.now = 1.0
    again = seq.take_retry(lane)
    assert again is batch and [p.id for p in again.to_send()] == ["1"]
    seq.answered(lane, [_score(batch.pairs[1])])
    assert [r.id for r in seq.pop_ready()] == ["0", "1", "2"]


def test_overloaded_items_surface_their_error_once_retries_are_used_up() -> None:
    seq = Sequencer(batch_size=1, max_in_flight=10, item_retry_delay=lambda n: None)
    lane = Lane()
    seq.begin_read()
    seq.end_read(_pairs(1), lane)
    busy = ItemError(ItemErrorCode.RESOURCE_EXHAUSTED, "busy", id="0")
    seq.answered(lane, [busy])
    assert seq.pop_ready() == [busy]


def test_an_answer_of_the_wrong_size_is_refused() -> None:
    seq = Sequencer(batch_size=2, max_in_flight=10)
    lane = Lane()
    seq.begin_read()
    seq.end_read(_pairs(2), lane)
    with pytest.raises(ValueError, match="1 results for a message of 2"):
        seq.answered(lane, [_score(Pair("p", "r"))])


def test_stalled_lanes_are_those_waiting_longer_than_the_timeout() -> None:
    clock = Clock()
    seq = Sequencer(batch_size=1, max_in_flight=10, clock=clock)
    busy, idle = Lane(), Lane()
    seq.begin_read()
    seq.end_read(_pairs(1), busy)
    clock.now = 5.0
    assert seq.stalled_lanes([busy, idle], 10.0) == []
    clock.now = 10.5
    assert seq.stalled_lanes([busy, idle], 10.0) == [busy]
    assert busy.stalled
    assert seq.stalled_lanes([busy, idle], None) == []


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 60),
    batch_size=st.integers(1, 7),
    lanes=st.integers(1, 3),
    script=st.lists(st.integers(0, 5), max_size=400),
)
def test_any_interleaving_of_answers_and_breaks_yields_each_pair_once_in_order(
    n: int, batch_size: int, lanes: int, script: list[int]
) -> None:
    """Drive the sequencer by a random script; every pair must come out exactly once, in order."""
    seq = Sequencer(batch_size=batch_size, max_in_flight=batch_size * 3)
    source = iter(_pairs(n))
    live = [Lane() for _ in range(lanes)]
    out: list[str] = []
    steps = iter(script)
    for tick in range(10_000):
        if seq.finished:
            break
        action = next(steps, None)
        if action is None:  # the script ran out: each lane sends, then answers, no more breaks
            action = 0 if (tick // lanes) % 2 == 0 else 2
        lane = live[tick % lanes]
        if action in (0, 1):  # the lane sends: a retry first, else a new batch
            if seq.take_retry(lane) is None and seq.wants_input():
                seq.begin_read()
                seq.end_read([p for _, p in zip(range(batch_size), source, strict=False)], lane)
        elif action in (2, 3) and lane.outstanding:  # the server answers the lane's oldest message
            batch = lane.outstanding[0]
            seq.answered(lane, [_score(p) for p in batch.to_send()])
        elif action == 4:  # the lane breaks and is replaced
            seq.lane_broken(lane)
            live[live.index(lane)] = Lane()
        out.extend(r.id for r in seq.pop_ready())
        assert seq.in_flight <= seq.max_in_flight
    else:
        pytest.fail("the sequencer never finished")
    assert out == [str(i) for i in range(n)]


# --- reconnect rule ---------------------------------------------------------------------------


def _err(code: grpc.StatusCode) -> errors.ScoringError:
    return errors.error_for(code, "x")


def test_reconnector_retries_retryable_codes_with_growing_backoff_then_gives_up() -> None:
    clock = Clock()
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=4.0, stream_reconnect_timeout_s=30)
    ceilings: list[float] = []
    r = Reconnector(policy, clock=clock, rng=lambda lo, hi: ceilings.append(hi) or hi)
    for _ in range(4):
        assert r.next_delay(_err(grpc.StatusCode.UNAVAILABLE)) is not None
    assert ceilings == [1.0, 2.0, 4.0, 4.0]
    r.progress()
    assert r.next_delay(_err(grpc.StatusCode.RESOURCE_EXHAUSTED)) == 1.0
    clock.now = 31.0
    assert r.next_delay(_err(grpc.StatusCode.UNAVAILABLE)) is None
    assert r.next_delay(_err(grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert Reconnector(None).next_delay(_err(grpc.StatusCode.UNAVAILABLE)) is None


def test_giving_up_names_why_the_server_could_not_be_reached_not_the_last_stall() -> None:
    """A lane that stalled while the channel kept failing to connect gives up with the
    connection's cause (it used to end, now and then, as 'no answer on the stream')."""
    clock = Clock()
    r = Reconnector(RetryPolicy(initial_backoff_s=0.1), clock=clock, connect_timeout=3.0)
    refused = errors.ConnectionFailedError(
        grpc.StatusCode.UNAVAILABLE, "connection refused", cause="connection refused", hint="--target"
    )
    stalled = _err(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert r.next_delay(refused) is not None
    clock.now = 4.0
    assert r.next_delay(stalled) is None
    assert r.final_error(stalled) is refused
    assert r.final_error(_err(grpc.StatusCode.INVALID_ARGUMENT)).code is grpc.StatusCode.INVALID_ARGUMENT
    r.progress()  # an answer came: an older connection failure no longer explains anything
    assert r.final_error(stalled) is stalled


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_aio_local_write_failure_reads_as_a_broken_stream_and_is_resent() -> None:
    """grpc.aio turns a write after the server ended the stream into INTERNAL 'Internal
    error from Core' (grpc/grpc#36066): a lane broken that way reconnects, while a real
    INTERNAL from the server does not."""
    policy = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.01)
    broken = lane_error(_RpcError(grpc.StatusCode.INTERNAL, CORE_WRITE_FAILURE), Lane())
    assert isinstance(broken, errors.UnavailableError) and "36066" in broken.message
    assert Reconnector(policy).next_delay(broken) is not None
    real = lane_error(_RpcError(grpc.StatusCode.INTERNAL, "the model worker failed"), Lane())
    assert real.code == grpc.StatusCode.INTERNAL
    assert Reconnector(policy).next_delay(real) is None


def test_item_retry_delays_stop_after_the_attempt_limit() -> None:
    delays = item_retry_delays(RetryPolicy(), rng=lambda lo, hi: hi)
    assert delays(1) == pytest.approx(0.2)
    assert delays(ITEM_RETRY_ATTEMPTS) is not None
    assert delays(ITEM_RETRY_ATTEMPTS + 1) is None
    assert item_retry_delays(None)(1) is None


# --- channel settings -------------------------------------------------------------------------


def test_service_config_has_round_robin_and_a_retry_policy_for_both_services() -> None:
    options = dict(ChannelSettings("dns:///pairscore:50051").options())
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert {n["service"] for n in method["name"]} == {"pairscore.v1.ScoringService", "grpc.health.v1.Health"}
    assert method["retryPolicy"] == {
        "maxAttempts": 5,
        "initialBackoff": "0.2s",
        "maxBackoff": "10s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.service_config_disable_resolution"] == 1


def test_no_retry_policy_and_pick_first_when_asked() -> None:
    options = dict(ChannelSettings("h:1", retry=None, load_balancing="pick_first").options())
    config = json.loads(options["grpc.service_config"])
    assert config == {"loadBalancingConfig": [{"pick_first": {}}]}
    assert options["grpc.enable_retries"] == 0


def test_token_rides_in_metadata_on_plaintext_and_in_call_credentials_on_tls() -> None:
    plain = ChannelSettings("h:1", token="s3cret")
    assert plain.call_metadata() == (("authorization", "Bearer s3cret"),)
    assert plain.channel_credentials() is None
    tls = ChannelSettings("h:1", token="s3cret", tls=True)
    assert tls.call_metadata() is None
    assert isinstance(tls.channel_credentials(), grpc.ChannelCredentials)
    named = ChannelSettings("10.0.0.1:1", tls=TlsConfig(server_name="pairscore.internal"))
    assert ("grpc.ssl_target_name_override", "pairscore.internal") in named.options()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": ""}, "target"),
        ({"target": "h:1", "load_balancing": "random"}, "load_balancing"),
        ({"target": "h:1", "token": "  "}, "token"),
    ],
)
def test_channel_settings_refuse_nonsense(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelSettings(**kwargs)  # type: ignore[arg-type]


def test_retry_policy_and_tls_config_validate() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=9)
    with pytest.raises(ValueError, match="status codes"):
        RetryPolicy(retryable_codes=("SOMETIMES",))
    with pytest.raises(ValueError, match="both"):
        TlsConfig(client_cert=b"x")


def test_iter_settings_defaults_and_checks() -> None:
    assert IterSettings.build(16, None, 2, 5.0) == IterSettings(16, 16 * 8 * 2, 2, 5.0)
    with pytest.raises(ValueError, match="max_in_flight"):
        IterSettings.build(16, 8, 1, None)
    with pytest.raises(ValueError, match="streams"):
        IterSettings.build(16, None, 0, None)


def test_to_pair_accepts_pairs_and_tuples_only() -> None:
    assert to_pair(("a", "b")) == Pair("a", "b")
    with pytest.raises(TypeError, match="tuple"):
        to_pair("ab c")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must be str"):
        to_pair((1, "b"))  # type: ignore[arg-type]


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgumentError),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.OverloadedError),
        (grpc.StatusCode.UNAVAILABLE, errors.UnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceededError),
        (grpc.StatusCode.UNAUTHENTICATED, errors.UnauthenticatedError),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDeniedError),
        (grpc.StatusCode.INTERNAL, errors.InternalError),
        (grpc.StatusCode.DATA_LOSS, errors.ScoringError),
    ],
)
def test_each_status_code_maps_to_its_exception_with_the_message(
    code: grpc.StatusCode, cls: type[errors.ScoringError]
) -> None:
    class Fake(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return code

        def details(self) -> str:
            return "the server's words"

    exc = errors.error_from_rpc(Fake())
    assert type(exc) is cls
    assert exc.code is code and exc.message == "the server's words"
    assert str(exc) == f"{code.name}: the server's words"
    assert exc.retryable == (code in errors.RETRYABLE_CODES)
