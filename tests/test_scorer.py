"""pairscore_server.Scorer, the in-process scorer: the same results as a real server on the
same model, every option of the RPC, item errors, any number of pairs."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pairscore.types import (
    Candidate,
    CandidateSet,
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    PrefixMode,
    ScoreOptions,
    TokenizationMode,
    Truncation,
)

from harness.lmeval import save_model_dir
from harness.servers import ROOT

PAIRS = [
    Pair("The capital of France is", " Paris.", id="a"),
    Pair("Hello world!", " How are you today?", id="b"),
    Pair("Question: what is two plus two?", " Answer: four.", id="c"),
    Pair("", "An empty prompt.", id="d"),
    Pair("Unicode: café naïve", " 😀🎉 你好", id="e"),
    Pair("The capital of France is", " Rome.", id="f"),
]


@pytest.fixture(scope="module")
def model_dir(gpt2_family: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tokenizer = gpt2_family
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("scorer") / "tiny")


@pytest.fixture(scope="module")
def scorer(model_dir: Path) -> Any:
    from pairscore_server import Scorer

    return Scorer(str(model_dir), device="cpu", dtype="float32")


@pytest.fixture
def server(model_dir: Path, start_server: Any) -> Any:
    """A real server that loaded the same directory itself (its own engine)."""
    from pairscore_server.engine.loading import load_engine
    from pairscore_server.engine.spec import ModelSpec

    return start_server(load_engine(ModelSpec(model=str(model_dir), device="cpu", dtype="float32")))


def test_importing_the_package_and_scorer_loads_no_torch() -> None:
    code = (
        "import sys\n"
        "import pairscore_server\n"
        "from pairscore_server import Scorer\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules) or 'clean')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": f"{ROOT / 'client'}:{ROOT / 'server'}", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "clean"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"return_tokens": True, "unconditional": True, "greedy": True},
        {"tokenization": "joint", "top_k": 3},
    ],
    ids=["default", "tokens-unconditional-greedy", "joint-topk"],
)
def test_scores_equal_a_real_servers(scorer: Any, server: Any, options: dict[str, Any]) -> None:
    with server.client() as client:
        want = client.score(PAIRS, **options)
    got = scorer.score(PAIRS, **options)
    assert all(isinstance(s, PairScore) for s in got)
    assert got == want  # exact: the server runs this very engine code on the same weights


def test_model_info_is_the_servers_without_its_request_limits(scorer: Any, server: Any) -> None:
    with server.client() as client:
        served = client.model_info()
    info = scorer.info
    assert (info.model_name, info.max_context_tokens, info.prefix_token_id, info.vocab_size) == (
        served.model_name,
        served.max_context_tokens,
        served.prefix_token_id,
        served.vocab_size,
    )
    assert (info.dtype, info.device) == ("float32", "cpu")


def test_options_as_an_object_or_as_keywords_not_both(scorer: Any) -> None:
    as_object = scorer.score(PAIRS[:2], ScoreOptions(tokenization=TokenizationMode.JOINT, greedy=True))
    as_keywords = scorer.score(PAIRS[:2], tokenization="joint", greedy=True)
    assert as_object == as_keywords
    assert as_object[0].response_is_greedy is not None
    with pytest.raises(ValueError, match="not both .*greedy"):
        scorer.score(PAIRS[:1], ScoreOptions(), greedy=True)
    with pytest.raises(ValueError, match="PrefixMode"):
        scorer.score(PAIRS[:1], prefix="sometimes")
    with pytest.raises(ValueError, match="top_k"):
        scorer.score(PAIRS[:1], top_k=-1)
    # the keywords are the clients' sugar, read by their one resolver (pairscore.inputs)
    with pytest.raises(TypeError, match="unknown option 'temperature'; the options are tokenization"):
        scorer.score(PAIRS[:1], temperature=0)  # type: ignore[call-arg]


def test_tuples_are_pairs_and_a_missing_text_is_refused(scorer: Any) -> None:
    assert scorer.score([("The capital of France is", " Paris.")]) == scorer.score(
        [Pair("The capital of France is", " Paris.")]
    )
    with pytest.raises(TypeError, match="missing text"):
        scorer.score([("a prompt", None)])


def test_a_pair_over_the_context_fails_alone_as_on_the_server(scorer: Any, server: Any) -> None:
    long = Pair("Hello world! " * 100, " too long", id="long")
    pairs = [PAIRS[0], long, PAIRS[1]]
    got = scorer.score(pairs)
    assert isinstance(got[1], ItemError) and got[1].code is ItemErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert got[1].id == "long" and "context" in got[1].message
    assert got[0] == scorer.score([PAIRS[0]])[0] and got[2] == scorer.score([PAIRS[1]])[0]
    with server.client() as client:
        served = client.score(pairs)
    assert isinstance(served[1], ItemError) and served[1].code is got[1].code
    assert [got[0], got[2]] == [served[0], served[2]]


def test_many_pairs_run_in_several_engine_calls_with_the_same_results(model_dir: Path) -> None:
    from pairscore_server import Scorer

    small = Scorer(str(model_dir), device="cpu", dtype="float32", max_batch_tokens=64)
    assert small.engine.max_call_tokens < 40 * 30  # the pairs below need several calls
    pairs = [Pair(f"Question {i}: what is {i} plus {i}?", f" Answer: {2 * i}.", id=str(i)) for i in range(40)]
    together = small.score(pairs)
    alone = [small.score([p])[0] for p in pairs[:5]]
    assert together[:5] == alone
    assert [s.id for s in together] == [p.id for p in pairs]


def test_candidates_equal_their_pairs(scorer: Any) -> None:
    sets = [
        CandidateSet(
            prompt="The capital of France is",
            candidates=(Candidate(" Paris.", id="p"), Candidate(" Rome.", id="r")),
            id="s1",
        ),
        CandidateSet(prompt="Hello world!", candidates=(Candidate(" Hi."),), id="s2"),
    ]
    results = scorer.score_candidates(sets, greedy=True)
    assert [r.id for r in results] == ["s1", "s2"]
    flat = [o for r in results for o in r.results]
    assert flat == scorer.score([p for s in sets for p in s.pairs()], greedy=True)
    with pytest.raises(TypeError, match="CandidateSet"):
        scorer.score_candidates([Pair("a", "b")])


def test_an_unloadable_model_says_why(tmp_path: Path) -> None:
    from pairscore_server import Scorer
    from pairscore_server.engine.spec import ModelLoadError

    with pytest.raises(ModelLoadError, match="not a model directory"):
        Scorer(str(tmp_path / "nothing-here"), device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        Scorer(str(tmp_path), dtype="float8")
    with pytest.raises(ValueError, match=r"host allocator must be one of \('retain', 'system'\)"):
        Scorer(str(tmp_path), host_allocator="tcmalloc")


def test_token_ids_prefix_none_and_truncation_equal_a_real_servers(scorer: Any, server: Any) -> None:
    texts = ["The capital of France is", " Paris.", "<|endoftext|>x"]
    ids = scorer.tokenize(texts)
    long = Pair("Hello world! " * 100, " still scored", id="long")
    pairs = [
        Pair(prompt_ids=ids[0], response_ids=ids[1], id="ids"),
        Pair("The capital of France is", " Paris.", id="text"),
        Pair(prompt_ids=ids[0], response=" Paris.", id="mixed"),
        Pair(prompt_ids=(10**6,), response_ids=ids[1], id="out-of-vocabulary"),
        long,
    ]
    options = ScoreOptions(prefix=PrefixMode.NONE, greedy=True, truncation=Truncation.LEFT)
    got = scorer.score(pairs, options)
    with server.client() as client:
        assert client.tokenize(texts) == ids
        assert client.tokenize(texts, parse_special_tokens=True) == scorer.tokenize(
            texts, parse_special_tokens=True
        )
        served = client.score(pairs, greedy=True, prefix="none", truncation="left")
    assert got == served
    assert replace(got[0], id="") == replace(got[1], id="") == replace(got[2], id="")  # the text's ids
    # The first prompt token is context only: one prompt token fewer than with the prefix token.
    assert got[0].prompt_tokens == len(ids[0]) - 1
    assert scorer.score(pairs[:1], greedy=True)[0].prompt_tokens == len(ids[0])
    assert isinstance(got[3], ItemError) and "vocabulary" in got[3].message
    assert isinstance(got[4], PairScore) and got[4].prompt_tokens_dropped > 0
    assert scorer.tokenize(["<|endoftext|>"], parse_special_tokens=True) != scorer.tokenize(["<|endoftext|>"])
