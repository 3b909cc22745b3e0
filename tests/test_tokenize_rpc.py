"""Tier 3: the Tokenize RPC through the real in-process server and the real clients.

Tokenize must hand back exactly the ids a ``Pair.prompt`` of the text is
scored with (so that ``prompt_ids`` round-trips), or with
``parse_special_tokens`` what transformers' ``tokenizer(text,
add_special_tokens=False)`` gives (lm-evaluation-harness's HFLM); it obeys
the server's limits, bearer-token auth and per-method metrics like the
other RPCs.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pairscore.aio import AsyncScoringClient
from pairscore.errors import InvalidArgumentError, ScoringError
from pairscore.types import Pair, PairScore, PrefixMode
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.fake_engine import FakeEngine
from harness.scoring import assert_same_scores
from harness.servers import metric_samples

TEXTS = ["Hello world", " The capital of France is", "café 😀", "<|endoftext|> typed by a user", ""]
TOKEN = "tokenize-secret"


def test_tokenize_round_trips_into_scoring(tiny_engine, start_server):
    st = start_server(tiny_engine)
    tokenizer = tiny_engine.tokenizer
    with st.client() as client:
        plain = client.tokenize(TEXTS)
        special = client.tokenize(TEXTS, parse_special_tokens=True)
        assert plain == tiny_engine.tokenize(TEXTS)
        assert special == [tuple(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert eot in special[3] and eot not in plain[3]
        # the plain ids are what a text prompt is scored with: same scores, both prefix modes
        for prefix in PrefixMode:
            by_text = client.score([Pair(t, " Paris.") for t in TEXTS], prefix=prefix)
            by_ids = client.score([Pair(prompt_ids=ids, response=" Paris.") for ids in plain], prefix=prefix)
            for a, b in zip(by_text, by_ids, strict=True):
                assert isinstance(a, PairScore) and isinstance(b, PairScore)
                assert_same_scores(a, b)
        assert client.tokenize([]) == []

    async def via_aio():
        async with AsyncScoringClient(st.target, timeout=20) as aio:
            return await aio.tokenize(TEXTS), await aio.tokenize(TEXTS, parse_special_tokens=True)

    assert asyncio.run(via_aio()) == (plain, special)
    samples = metric_samples(st.metrics_text())
    assert samples[("pairscore_requests_total", (("code", "OK"), ("method", "Tokenize")))] >= 5


def test_tokenize_obeys_the_request_limits_and_the_server_goes_on(start_server):
    st = start_server(FakeEngine(), max_pairs_per_request=3, max_text_chars=10)
    with st.client() as client:
        assert client.tokenize(["abc", "", "0123456789"]) == [(97, 98, 99), (), tuple(range(48, 58))]
        with pytest.raises(InvalidArgumentError, match=r"4 texts.*at most 3.*max_pairs_per_request"):
            client.tokenize(["a"] * 4)
        with pytest.raises(InvalidArgumentError, match=r"texts\[1\] has 11 characters.*max_text_chars"):
            client.tokenize(["a", "x" * 11])
        with pytest.raises(TypeError, match=r"texts\[0\] must be a str"):
            client.tokenize([None])  # type: ignore[list-item]
        assert client.tokenize(["ok"]) == [(111, 107)]
    samples = metric_samples(st.metrics_text())
    assert samples[("pairscore_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Tokenize")))] == 2


def test_tokenize_answer_over_the_limit_is_refused_one_that_fits_is_not(start_server):
    # The fake engine's ids are code points: "x" is one byte, so 1000 of them encode to
    # 1006 bytes (1 + 2 + 1 + 2 + 1000) and fit 1024; 1100 do not. (The answer used to
    # be bounded at 5 bytes an id, which refused 300 of them.)
    st = start_server(FakeEngine(), max_response_bytes=1024)
    with st.client() as client:
        assert len(client.tokenize(["x" * 1000])[0]) == 1000
        with pytest.raises(InvalidArgumentError, match=r"max_response_bytes"):
            client.tokenize(["x" * 1100])


def test_tokenize_needs_the_bearer_token(start_server):
    st = start_server(FakeEngine(), auth_tokens=(TOKEN,))
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(pb.TokenizeRequest(texts=["hi"]), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with st.client(token=TOKEN) as client:
        assert client.tokenize(["hi"]) == [(104, 105)]
    with st.client() as client, pytest.raises(ScoringError) as err:
        client.tokenize(["hi"])
    assert err.value.code is grpc.StatusCode.UNAUTHENTICATED


def test_tokenize_malformed_bytes_are_invalid_argument(start_server):
    st = start_server(FakeEngine())
    with grpc.insecure_channel(st.target) as channel:
        raw = channel.unary_unary("/pairscore.v1.ScoringService/Tokenize")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\xff\xff", timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "TokenizeRequest" in info.value.details()
