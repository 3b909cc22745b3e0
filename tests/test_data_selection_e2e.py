"""Tier 3: the data-selection scores through the real server, clients and CLI (docs/scores.md).

The server runs the tiny GPT-2-style engine in-process. The direct
computation of log P(y) is a separate scoring of ("", y) through the same
server; the CLI tests filter a JSONL file by IFD, also across an
interrupted run resumed with --resume.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pairscore import cli
from pairscore.aio import AsyncScoringClient
from pairscore.pipeline.job import Job
from pairscore.pipeline.runner import Runner
from pairscore.pipeline.selection import Thresholds, parse_bound
from pairscore.types import Pair, PairScore
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

from harness.models import make_engine
from harness.scoring import mixed_pairs
from harness.servers import ServerThread

TOL = 1e-4


@pytest.fixture(scope="module")
def server(gpt2_family) -> Iterator[ServerThread]:
    model, tokenizer = gpt2_family
    st = ServerThread(make_engine(model, tokenizer)).start()
    yield st
    st.stop()


def test_unconditional_equals_scoring_empty_prompt_through_the_server(server: ServerThread) -> None:
    pairs = [p for p in mixed_pairs(16, seed=21) if p.response]
    with server.client() as client:
        got = client.score(pairs, unconditional=True, greedy=True)
        direct = client.score([Pair("", p.response) for p in pairs])
        streamed = list(client.score_iter(pairs, batch_size=5, unconditional=True))
    for g, d, s in zip(got, direct, streamed, strict=True):
        assert isinstance(g, PairScore) and isinstance(d, PairScore) and isinstance(s, PairScore)
        assert g.unconditional_logprob == pytest.approx(d.conditional_logprob, abs=TOL)
        assert g.pmi == pytest.approx(g.conditional_logprob - d.conditional_logprob, abs=TOL)
        assert g.ifd == pytest.approx(g.conditional_logprob / d.conditional_logprob, rel=1e-4)
        assert isinstance(g.response_is_greedy, bool)
        assert s.unconditional_logprob == pytest.approx(g.unconditional_logprob, abs=TOL)
        assert d.unconditional_logprob is None and d.ifd is None and d.response_is_greedy is None


def test_async_client_passes_the_options(server: ServerThread) -> None:
    async def body() -> list[Any]:
        async with AsyncScoringClient(server.target, timeout=30) as client:
            return await client.score([Pair("a question", " an answer")], unconditional=True, top_k=3)

    [got] = asyncio.run(body())
    assert got.unconditional_logprob is not None
    assert got.tokens and all(len(t.top_k) == 3 for t in got.tokens)


def test_old_clients_get_the_same_answer_without_the_new_fields(server: ServerThread) -> None:
    """A request built without the new options (as an old client sends it) gets no new field."""
    request = pb.ScoreRequest(
        pairs=[pb.Pair(prompt="The capital of France is", response=" Paris.")],
        options=pb.ScoreOptions(return_tokens=True),
    )
    with grpc.insecure_channel(server.target) as channel:
        [result] = pb_grpc.ScoringServiceStub(channel).Score(request, timeout=30).results
    scores = result.scores
    for name in ("unconditional_logprob", "pmi", "ifd", "response_is_greedy"):
        assert not scores.HasField(name)
    assert all(t.rank == 0 and not t.top_k for t in scores.tokens)
    with server.client() as client:
        [plain] = client.score([Pair("The capital of France is", " Paris.")], return_tokens=True)
    assert scores.conditional_logprob == pytest.approx(plain.conditional_logprob, abs=1e-5)


def test_model_info_reports_max_top_k(server: ServerThread) -> None:
    with server.client() as client:
        assert client.model_info().max_top_k == 20


@pytest.mark.parametrize("k", [21, -1])
def test_top_k_out_of_range_is_invalid_argument_naming_the_limit(server: ServerThread, k: int) -> None:
    request = pb.ScoreRequest(pairs=[pb.Pair(prompt="a", response="b")], options=pb.ScoreOptions(top_k=k))
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ScoringServiceStub(channel).Score(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_top_k" in (refused.value.details() or "") and "20" in (refused.value.details() or "")


def test_client_refuses_a_negative_top_k_before_sending(server: ServerThread) -> None:
    with server.client() as client, pytest.raises(ValueError, match="top_k"):
        client.score([Pair("a", "b")], top_k=-1)


def test_query_prints_the_new_scores(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["query", "--target", server.target, "--unconditional", "--greedy", "--top-k", "2", "Q:", " A."]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    assert {"unconditional_logprob", "pmi", "ifd", "response_is_greedy"} <= record.keys()
    assert all(len(t["top_k"]) == 2 and t["rank"] >= 1 for t in record["tokens"])
    code = cli.main(["query", "--target", server.target, "Q:", " A."])
    assert "ifd" not in json.loads(capsys.readouterr().out)  # not asked for: the line is as before


def _write_rows(path: Path, n: int = 40) -> list[dict[str, Any]]:
    rows = [
        {"id": i, "prompt": p.prompt, "response": p.response} for i, p in enumerate(mixed_pairs(n, seed=9))
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_filter_by_ifd_from_the_cli(server: ServerThread, tmp_path: Path) -> None:
    src, scored, kept = tmp_path / "in.jsonl", tmp_path / "scored.jsonl", tmp_path / "kept.jsonl"
    _write_rows(src)
    common = ["--target", server.target, "--progress", "none", "--timeout", "30"]
    assert cli.main(["score", str(src), "-o", str(scored), "--scores", "unconditional,greedy", *common]) == 0
    rows = _read(scored)
    assert {"unconditional_logprob", "pmi", "ifd", "response_is_greedy"} <= rows[0].keys()
    code = cli.main(
        [
            "filter",
            str(src),
            "-o",
            str(kept),
            "--max",
            "ifd=1",
            "--top-among",
            "passing",
            "--top-fraction",
            "0.25",
            "--by",
            "ifd",
            "--resume",
            *common,
        ]
    )
    assert code == 0
    # expected: of the rows with IFD <= 1, the ceil(25 %) highest IFD (ties by input order)
    candidates = [r for r in rows if r["ifd"] is not None and r["ifd"] <= 1]
    k = math.ceil(0.25 * len(candidates))
    want = sorted(r["id"] for r in sorted(candidates, key=lambda r: (-r["ifd"], r["id"]))[:k])
    got = [r["id"] for r in _read(kept)]
    assert got == want and got
    assert all(r["ifd"] <= 1 for r in _read(kept))
    # pairscore report draws any of the new columns
    from pairscore.pipeline.report import read_metric

    data = read_metric(str(scored), "ifd")
    assert len(data.values) == sum(r["ifd"] is not None for r in rows)
    assert data.missing == sum(r["ifd"] is None for r in rows) > 0  # empty responses
    assert read_metric(str(scored), "greedy").metric.column == "response_is_greedy"
    pytest.importorskip("matplotlib")
    figure = tmp_path / "pmi.png"
    assert cli.main(["report", str(scored), "--metric", "pmi", "-o", str(figure)]) == 0
    assert figure.stat().st_size > 0


def test_unknown_score_name_is_a_cli_error(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    _write_rows(src, 4)
    with pytest.raises(SystemExit) as exited:
        cli.main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), "--scores", "conditional,entropy",
                  "--target", server.target])  # fmt: skip
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown score 'entropy'" in err and "conditional, unconditional, greedy" in err


class _InterruptingClient:
    """The server's client, but the stream is interrupted (Ctrl-C) after ``after`` results."""

    def __init__(self, client: Any, after: int) -> None:
        self._client, self._after = client, after

    def model_info(self, **kwargs: Any) -> Any:
        return self._client.model_info(**kwargs)

    def score_iter(self, pairs: Any, **kwargs: Any) -> Any:
        inner = self._client.score_iter(pairs, **kwargs)
        after = self._after

        def gen() -> Iterator[Any]:
            try:
                for i, outcome in enumerate(inner):
                    if i == after:
                        raise KeyboardInterrupt
                    yield outcome
            finally:
                inner.close()

        return gen()


def test_filter_by_ifd_resumes_after_an_interruption(server: ServerThread, tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_rows(src, 60)

    def job(out: Path, resume: bool) -> Job:
        return Job(
            command="filter",
            input=str(src),
            output=str(out),
            rejected=str(out) + ".rejected.jsonl",
            thresholds=Thresholds([parse_bound("ifd=1", upper=True)]),
            top_fraction=0.3,
            top_among="passing",
            by="ifd",
            resume=resume,
            checkpoint_seconds=0.0,
            progress="none",
            scores=("unconditional",),
        )

    with server.client() as client:
        Runner(job(tmp_path / "whole.jsonl", False), client).run()
        with pytest.raises(KeyboardInterrupt):
            Runner(job(tmp_path / "kept.jsonl", True), _InterruptingClient(client, 25)).run()
        outcome = Runner(job(tmp_path / "kept.jsonl", True), client).run()
    assert outcome.resumed_from >= 25  # it continued, it did not start over
    whole, resumed = _read(tmp_path / "whole.jsonl"), _read(tmp_path / "kept.jsonl")
    assert [r["id"] for r in resumed] == [r["id"] for r in whole] and whole
    for a, b in zip(resumed, whole, strict=True):
        assert a["ifd"] == pytest.approx(b["ifd"], rel=1e-5)


def test_ray_and_datasets_scorers_add_the_columns(server: ServerThread) -> None:
    from pairscore.hf import ScoreColumns
    from pairscore.ray import ServiceScorer

    batch = {"prompt": ["Q: two plus two?", None, "Q:"], "response": [" four", " x", ""]}
    ray_scorer = ServiceScorer(server.target, scores="unconditional,greedy", timeout=30)
    hf_scorer = ScoreColumns(server.target, scores=["unconditional"], timeout=30)
    try:
        ray_out = ray_scorer(batch)
        hf_out = hf_scorer(batch)
    finally:
        ray_scorer.client.close()
        hf_scorer.close()
    assert ray_out["prompt"] == batch["prompt"]  # the batch's columns are kept
    assert isinstance(ray_out["ifd"][0], float) and isinstance(ray_out["response_is_greedy"][0], bool)
    assert ray_out["ifd"][1] is None and ray_out["error"][1] == "invalid_row"
    assert ray_out["ifd"][2] is None and ray_out["pmi"][2] == 0.0  # empty response: IFD undefined
    assert hf_out["ifd"][0] == pytest.approx(ray_out["ifd"][0], rel=1e-5)
    assert "response_is_greedy" not in hf_out
    with pytest.raises(ValueError, match="unknown score 'entropy'"):
        ServiceScorer(server.target, scores="entropy")


def test_query_refuses_a_negative_top_k(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["query", "--target", server.target, "--top-k", "-1", "Q:", " A."])
    assert exited.value.code == 2 and "--top-k must be >= 0" in capsys.readouterr().err
    assert cli.main(["query", "--target", server.target, "--top-k", "21", "Q:", " A."]) == 1
    assert "max_top_k" in capsys.readouterr().err
