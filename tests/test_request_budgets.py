"""The request path's budgets, as a client sees them (issue 22).

GetModelInfo reports the character budgets and the answer limit, and they are
the ones the server enforces; Tokenize's answer is sized exactly, refused before
any tokenization when it must be too large (a sound lower bound) and otherwise
stopped at the first chunk after which it cannot fit.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import pytest

from pairscore import errors
from pairscore.aio import AsyncScoringClient
from pairscore.convert import model_info_from_pb, model_info_to_pb
from pairscore.types import Pair, Truncation
from pairscore.v1 import scoring_pb2 as pb
from pairscore_server.preparing import DEFAULT_CHUNK_CHARS, text_chunks
from pairscore_server.tokenizing import answer_bytes, answer_bytes_at_least, entry_bytes, max_token_chars

from harness.fake_engine import FakeEngine
from harness.models import make_engine
from harness.openai_http import parse_raw_answer, raw_connection, read_until_closed
from harness.servers import metric_samples
from harness.spy_engine import SpyEngine, word_salad

BUDGETS = {"max_request_chars": 50_000, "max_preparing_chars": 200_000, "max_response_bytes": 64 * 1024}


def _tokenize_calls(spy: SpyEngine) -> int:
    return sum(1 for first, _, _, _ in spy.calls if first == "tokenize")


def test_model_info_reports_the_budgets_the_server_enforces(tiny_engine, start_server) -> None:
    st = start_server(tiny_engine, **BUDGETS)
    with st.client(timeout=60) as client:
        info = client.model_info()
        assert (info.max_request_chars, info.max_preparing_chars, info.max_response_bytes) == (
            50_000,
            200_000,
            64 * 1024,
        )
        # exactly the reported budget is taken, one character more is refused by name
        fits = client.score([Pair(word_salad(49_990, 1), "0123456789")], truncation=Truncation.LEFT)
        assert len(fits) == 1 and not isinstance(fits[0], Exception)
        with pytest.raises(errors.InvalidArgumentError, match="max_request_chars"):
            client.score([Pair(word_salad(49_991, 1), "0123456789")], truncation=Truncation.LEFT)

    async def aio() -> object:
        async with AsyncScoringClient(st.target, timeout=30) as client:
            return await client.model_info()

    assert asyncio.run(aio()) == info


def test_default_budgets_are_reported(tiny_engine, start_server) -> None:
    st = start_server(tiny_engine)
    limits = st.server.limits
    with st.client(timeout=30) as client:
        info = client.model_info()
    assert info.max_request_chars == limits.max_request_chars == 16 * 1024 * 1024
    assert info.max_preparing_chars == limits.max_preparing_chars == 64 * 1024 * 1024
    assert info.max_response_bytes == limits.max_response_bytes == 4 * 1024 * 1024


def test_model_info_budgets_cross_the_converter(tiny_engine) -> None:
    info = tiny_engine.info
    import dataclasses

    sent = dataclasses.replace(info, max_request_chars=7, max_preparing_chars=11, max_response_bytes=13)
    wire = pb.GetModelInfoResponse.FromString(model_info_to_pb(sent).SerializeToString())
    assert (wire.max_request_chars, wire.max_preparing_chars, wire.max_response_bytes) == (7, 11, 13)
    assert model_info_from_pb(wire) == sent


# --- Tokenize's answer size ----------------------------------------------------------------


def test_answer_bytes_is_the_encoded_size() -> None:
    rng = random.Random(0)
    cases: list[list[list[int]]] = [[], [[]], [[0]], [[127, 128, 16383, 16384, 2**21, 2**28, 2**31 - 1]]]
    for _ in range(200):
        cases.append(
            [
                [
                    rng.choice((rng.randrange(128), rng.randrange(50_000), rng.randrange(2**31)))
                    for _ in range(rng.randrange(300))
                ]
                for _ in range(rng.randrange(5))
            ]
        )
    for ids in cases:
        encoded = pb.TokenizeResponse(tokens=[pb.TokenIds(ids=i) for i in ids]).SerializeToString()
        assert answer_bytes(ids) == len(encoded), ids
        assert sum(entry_bytes(i) for i in ids) == len(encoded)


ADVERSARIAL = [
    "",
    " ",
    " " * 5000,
    "\n" + " " * 4000,
    "#" * 3000,
    "-" * 3000 + "=" * 3000,
    "😀" * 700,
    "e\u0301" * 900 + "\u1100\u1161\u11a8" * 300,
    "ab\u200dcd" * 400,
    "<|endoftext|><s></s>" * 100,
    word_salad(20_000, 3),
]


@pytest.mark.parametrize("family_name", ["gpt2_family", "llama_family", "qwen2_family"])
def test_the_lower_bound_holds_on_every_tokenizer_family(family_name, request) -> None:
    model, tokenizer = request.getfixturevalue(family_name)
    engine = make_engine(model, tokenizer)
    info = engine.info
    per_token = max_token_chars(
        normalizes=info.tokenizer_normalizes, max_token_text_bytes=info.max_token_text_bytes
    )
    assert (per_token is None) is (
        family_name == "qwen2_family"
    )  # the NFC tokenizer has no per-character bound
    for special in (False, True):
        ids = engine.tokenize(ADVERSARIAL, parse_special_tokens=special)
        for text, got, floor in zip(
            ADVERSARIAL, ids, answer_bytes_at_least(ADVERSARIAL, per_token), strict=True
        ):
            assert entry_bytes(got) >= floor, (text[:30], len(got), floor)


def test_an_answer_that_fits_is_answered_one_byte_over_is_refused(tiny_engine, start_server) -> None:
    """The old check counted 5 bytes an id and 12 a text; the tiny vocabulary's ids take 1-2."""
    texts = [word_salad(3_000, i) for i in range(40)]
    exact = answer_bytes(tiny_engine.tokenize(texts))
    assert exact < sum(12 + 5 * len(i) for i in tiny_engine.tokenize(texts)) / 2
    spy = SpyEngine(tiny_engine)
    st = start_server(spy, max_response_bytes=exact)
    with st.client(timeout=60) as client:
        assert client.tokenize(texts) == tiny_engine.tokenize(texts)
    st.stop()
    st = start_server(spy, max_response_bytes=exact - 1)
    with st.client(timeout=60) as client, pytest.raises(errors.InvalidArgumentError) as refused:
        client.tokenize(texts)
    message = str(refused.value)
    assert f"{exact - 1}-byte answer limit" in message and "--max-response-bytes" in message
    assert "fewer texts per call" in message


def test_an_answer_that_must_be_too_large_is_refused_before_tokenizing(tiny_engine, start_server) -> None:
    spy = SpyEngine(tiny_engine)
    st = start_server(spy, max_response_bytes=1024)
    with st.client(timeout=60) as client:
        for texts in (["", "a"] * 300, [word_salad(100_000, 5)]):  # many texts; one long text
            with pytest.raises(errors.InvalidArgumentError) as refused:
                client.tokenize(texts)
            assert "must take at least" in str(refused.value) and "nothing was tokenized" in str(
                refused.value
            )
            assert "fewer texts per call" in str(refused.value)
        assert _tokenize_calls(spy) == 0
        assert len(client.tokenize(["", "a"] * 100)) == 200  # 2-3 bytes a text: fits


def test_tokenize_stops_at_the_first_chunk_after_which_the_answer_cannot_fit(
    tiny_engine, start_server
) -> None:
    texts = [word_salad(10_000, i) for i in range(120)]
    chunks = text_chunks(texts, DEFAULT_CHUNK_CHARS)
    limit = 200_000
    info = tiny_engine.info
    floors = answer_bytes_at_least(
        texts, max_token_chars(normalizes=False, max_token_text_bytes=info.max_token_text_bytes)
    )
    size = 0
    expected = None
    for k, chunk in enumerate(chunks, 1):
        size += answer_bytes(tiny_engine.tokenize([texts[i] for i in chunk]))
        if size + sum(floors[chunk[-1] + 1 :]) > limit:
            expected = k
            break
    assert expected is not None and 1 < expected < len(chunks) / 2
    spy = SpyEngine(tiny_engine)
    st = start_server(spy, max_response_bytes=limit)
    with st.client(timeout=60) as client, pytest.raises(errors.InvalidArgumentError) as refused:
        client.tokenize(texts)
    assert _tokenize_calls(spy) == expected
    assert "tokenization stopped there" in str(refused.value)


# --- the OpenAI port's refusals, counted ---------------------------------------------------

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
GOOD = {"model": "fake-model", "prompt": "hello", "echo": True, "max_tokens": 0, "logprobs": 0}


def _refusals(st: Any) -> dict[str, float]:
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in metric_samples(st.metrics_text()).items()
        if name == "pairscore_http_refusals_total"
    }


def test_http_refusals_are_counted_by_reason(start_server) -> None:
    st = start_server(
        FakeEngine(),
        openai_port=0,
        max_concurrent_rpcs=6,
        openai_header_timeout_s=1.0,
        openai_body_timeout_s=1.0,
    )
    port = st.server.openai_port
    assert _refusals(st) == {"connection_cap": 0, "header_timeout": 0, "body_timeout": 0}
    # an idle keep-alive connection that was served and then closed by the header timer
    # owes nothing: not counted
    served = raw_connection(
        port, HEAD + f"Content-Length: {len(json.dumps(GOOD))}\r\n\r\n".encode() + json.dumps(GOOD).encode()
    )
    partial = [raw_connection(port, HEAD) for _ in range(2)]  # part of a head
    silent = [raw_connection(port) for _ in range(2)]  # nothing at all
    stalled = raw_connection(port, HEAD + b"Content-Length: 1000\r\n\r\n{")  # half a body
    time.sleep(0.3)
    over = [raw_connection(port) for _ in range(3)]  # 6 open: these are over the cap
    for sock in over:
        data, closed = read_until_closed(sock, timeout=10)
        assert closed and parse_raw_answer(data)[0] == 503
    data, _ = read_until_closed(stalled, timeout=20)
    assert parse_raw_answer(data)[0] == 408
    answer, closed = read_until_closed(served, timeout=20)
    assert closed and parse_raw_answer(answer)[0] == 200
    for sock in partial + silent:
        assert read_until_closed(sock, timeout=20)[1]
    for sock in [served, stalled, *partial, *silent, *over]:
        sock.close()
    deadline = time.monotonic() + 10
    while _refusals(st)["header_timeout"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert _refusals(st) == {"connection_cap": 3, "header_timeout": 4, "body_timeout": 1}
