"""A request whose answer could not be sent is refused before any scoring (issue 12).

Before, the server scored everything, then failed the send with
RESOURCE_EXHAUSTED, which clients took for overload and resent forever.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from pairscore.convert import response_to_pb
from pairscore.types import ItemError, Pair, PairScore, ScoreOptions
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.response_size import result_bytes_bound

from harness.fake_engine import FakeEngine
from harness.scoring import mixed_pairs
from harness.servers import ServerThread, metric_samples


def test_the_bound_holds_and_is_tight_on_both_tokenizer_families(engine) -> None:
    pairs = mixed_pairs(40, seed=5) + [Pair("e\u0301 😀 你好", " naïve\n\t", id="x" * 300)]
    outcomes = engine.score_pairs(pairs, ScoreOptions(return_tokens=True))
    actual = response_to_pb(outcomes).ByteSize()
    bound = 0
    for pair, out in zip(pairs, outcomes, strict=True):
        if isinstance(out, ItemError):
            bound += result_bytes_bound(id=pair.id, message=out.message)
        else:
            assert isinstance(out, PairScore)
            text = len(pair.prompt.encode()) + len(pair.response.encode())
            tokens = out.prompt_tokens + out.response_tokens
            bound += result_bytes_bound(id=pair.id, tokens=tokens, text_bytes=text)
    assert actual <= bound <= 3 * actual, (actual, bound)


def test_a_too_large_answer_is_refused_before_scoring(start_server: Callable[..., ServerThread]) -> None:
    engine = FakeEngine(max_context=4096)
    st = start_server(engine, max_response_bytes=8192)
    big = pb.ScoreRequest(
        pairs=[pb.Pair(prompt="p" * 300, response="r" * 300, id=f"b{i}") for i in range(4)],
        options=pb.ScoreOptions(return_tokens=True),
    )
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Score(big, timeout=10)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = refused.value.details() or ""
        assert "8192-byte answer limit (max_response_bytes" in details
        assert "leave out the per-token detail (return_tokens)" in details
        assert engine.batches == [], "nothing was scored"
        # the same pairs without per-token detail fit, and are scored
        big.options.return_tokens = False
        assert len(stub.Score(big, timeout=10).results) == 4
        # in a stream, the message's pairs get the refusal as item errors and the stream goes on
        big.options.return_tokens = True
        small = pb.ScoreRequest(pairs=[pb.Pair(prompt="a", response="b", id="s")])
        answers = list(stub.ScoreStream(iter([big, small]), timeout=10))
        assert [r.WhichOneof("outcome") for r in answers[0].results] == ["error"] * 4
        assert answers[1].results[0].WhichOneof("outcome") == "scores"
    samples = metric_samples(st.metrics_text())
    assert samples[("pairscore_rejected_pairs_total", (("reason", "response_too_large"),))] == 8


def test_a_plain_grpc_client_is_never_the_one_that_finds_out(
    start_server: Callable[..., ServerThread],
) -> None:
    """gRPC clients accept 4 MiB answers unless they raise their limit; the server's default
    answer limit is the same, so a plain client gets the server's reason, not its own
    'received message larger than max' (RESOURCE_EXHAUSTED, which reads as overload)."""
    st = start_server(FakeEngine(max_context=4096))
    request = pb.ScoreRequest(
        pairs=[pb.Pair(prompt="p" * 2000, response="r" * 2000, id=f"b{i}") for i in range(30)],
        options=pb.ScoreOptions(return_tokens=True),
    )  # 120000 tokens of detail: about 5 MiB
    with grpc.insecure_channel(st.target) as channel:  # gRPC's default 4 MiB receive limit
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ScoringServiceStub(channel).Score(request, timeout=20)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "4194304-byte answer limit (max_response_bytes" in (refused.value.details() or "")


def test_empty_candidate_sets_count_toward_the_answer_limit(
    start_server: Callable[..., ServerThread],
) -> None:
    """Issue 22: sets without candidates were answered unchecked (100,000 of them: 5.8 MB
    past the 4 MiB limit); their results are the whole answer, and they count too."""
    st = start_server(FakeEngine(), max_response_bytes=64 << 10)
    many = pb.ScoreCandidatesRequest(
        sets=[pb.CandidateSet(id=f"set-{i:06d}", prompt="p") for i in range(5000)]
    )
    few = pb.ScoreCandidatesRequest(sets=[pb.CandidateSet(id=f"set-{i:06d}", prompt="p") for i in range(100)])
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        assert len(stub.ScoreCandidates(few, timeout=10).sets) == 100
        with pytest.raises(grpc.RpcError) as refused:
            answer = stub.ScoreCandidates(many, timeout=10)
            pytest.fail(f"answered {answer.ByteSize()} bytes past the 65536-byte limit")
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "65536-byte answer limit (max_response_bytes" in (refused.value.details() or "")
