"""One rule for a missing prompt or response (None, or NaN from pandas) at every entry point.

* The client API (score, score_iter, score_stream, the asyncio twin) refuses
  a Pair whose prompt or response is not text with a TypeError before
  sending anything; it used to send None as an empty text and score it.
* ``pairscore score`` (and filter), :mod:`pairscore.hf` and
  :mod:`pairscore.ray` give such a row error ``invalid_row`` and nulls; see
  test_examples_datasets and test_ray_module for the last two.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from pairscore import cli
from pairscore.aio import AsyncScoringClient
from pairscore.client import ScoringClient
from pairscore.types import Pair

from harness.fake_engine import expected_score
from harness.servers import StubServer, StubServicer

NAN = math.nan


@pytest.fixture(scope="module")
def stub() -> Iterator[StubServer]:
    st = StubServer(StubServicer())
    yield st
    st.stop()


@pytest.mark.parametrize(
    "pair",
    [Pair(None, "b"), Pair("a", None), Pair(NAN, "b"), ("a", None), ("a", NAN)],  # type: ignore[arg-type]
    ids=["Pair-None-prompt", "Pair-None-response", "Pair-NaN-prompt", "tuple-None", "tuple-NaN"],
)
def test_the_client_refuses_a_missing_text_before_sending(stub: StubServer, pair: object) -> None:
    with ScoringClient(stub.target, timeout=10) as client:
        with pytest.raises(TypeError, match="missing"):
            client.score([("ok", "fine"), pair])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="missing"):
            list(client.score_iter([("ok", "fine"), pair]))  # type: ignore[list-item]
        with pytest.raises(TypeError, match="missing"):
            list(client.score_stream([[pair]]))  # type: ignore[list-item]

    async def aio() -> None:
        async with AsyncScoringClient(stub.target, timeout=10) as client:
            with pytest.raises(TypeError, match="missing"):
                await client.score([pair])  # type: ignore[list-item]

    asyncio.run(aio())


def test_nothing_reaches_the_server_for_a_pair_with_none(tmp_path: Path) -> None:
    servicer = StubServicer()
    st = StubServer(servicer)
    try:
        with ScoringClient(st.target, timeout=10) as client:
            with pytest.raises(TypeError):
                client.score([Pair(None, "b", id="x")])  # type: ignore[arg-type]
    finally:
        st.stop()
    assert servicer.sightings == {}  # it used to be scored as an empty prompt


def test_score_rows_marks_missing_texts_invalid_and_scores_the_rest() -> None:
    from pairscore.inputs import pair_problem
    from pairscore.pipeline.row_batches import score_rows

    sent: list[Pair] = []

    def score(pairs: list[Pair]) -> list[object]:
        sent.extend(pairs)
        return [expected_score(p) for p in pairs]

    table = score_rows(score, ["a", None, NAN, "b", 3], ["x", "y", "z", None, "w"])
    assert table["error"] == [None, "invalid_row", "invalid_row", "invalid_row", "invalid_row"]
    assert sent == [Pair("a", "x")]
    assert table["conditional_logprob"][0] == -0.25 and table["conditional_logprob"][1] is None
    assert pair_problem("a", "b") is None
    assert pair_problem(None, "b") == "field 'prompt' is missing"
    assert pair_problem("a", NAN) == "field 'response' is missing (NaN)"


def test_cli_rows_with_null_or_nan_are_invalid_rows(stub: StubServer, tmp_path: Path) -> None:
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(
        '{"prompt": "Q", "response": "ab"}\n{"prompt": null, "response": "ab"}\n'
        '{"prompt": "Q", "response": NaN}\n'
    )
    code = cli.main(["score", str(src), "-o", str(out), "--target", stub.target, "--progress", "none"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error"] for r in rows] == [None, "invalid_row", "invalid_row"]
    assert rows[1]["error_message"] == "field 'prompt' is missing"
    assert rows[2]["error_message"] == "field 'response' is missing (NaN)"
