"""Issue 14, candidates: one prompt, N responses (rpc ScoreCandidates), through the real
in-process server and the real client over loopback.

Each candidate must score as the Pair (prompt, candidate) scored alone, within
1e-5 nats; the prompt is computed once (pairscore_forward_tokens_total{kind="reused"});
a bad set answers item errors while the other sets are scored; limits count all
candidates of the request; auth covers the new method.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pairscore import Candidate, CandidateSet, ItemError, ItemErrorCode, Pair, PairScore, ScoreOptions
from pairscore.aio import AsyncScoringClient
from pairscore.errors import InvalidArgumentError, UnauthenticatedError
from pairscore.types import ChatMessage, Truncation

from harness.servers import metric_samples

TOL = 1e-5  # nats, the bound for candidates against separate pairs

PROMPT = "The quick brown fox jumps over the lazy dog, and then it says:"
RESPONSES = (" hello world", " 42", "", " naïve café 😀 the end", " return x + y")


def _scores(outcomes):
    assert all(isinstance(o, PairScore) for o in outcomes), outcomes
    return outcomes


def _same(a: PairScore, b: PairScore) -> None:
    assert (a.prompt_tokens, a.response_tokens) == (b.prompt_tokens, b.response_tokens)
    assert a.joint_logprob == pytest.approx(b.joint_logprob, abs=TOL)
    assert a.prompt_logprob == pytest.approx(b.prompt_logprob, abs=TOL)
    assert a.conditional_logprob == pytest.approx(b.conditional_logprob, abs=TOL)
    assert a.joint_logprob == pytest.approx(a.prompt_logprob + a.conditional_logprob, abs=1e-9)


@pytest.fixture
def server(start_server, tiny_engine):
    return start_server(tiny_engine)


def test_candidates_equal_separate_pairs_and_the_prompt_is_computed_once(server) -> None:
    with server.client() as client:
        alone = _scores([client.score([Pair(PROMPT, r)])[0] for r in RESPONSES])
        before = metric_samples(server.metrics_text())
        [result] = client.score_candidates(
            [
                CandidateSet(
                    prompt=PROMPT,
                    id="s",
                    candidates=tuple(Candidate(r, id=f"c{i}") for i, r in enumerate(RESPONSES)),
                )
            ]
        )
        after = metric_samples(server.metrics_text())
    assert result.id == "s"
    assert [o.id for o in result.results] == [f"c{i}" for i in range(len(RESPONSES))]
    for got, want in zip(_scores(result.results), alone, strict=True):
        _same(got, want)
    # 1 prefix + m prompt tokens are computed for the first candidate and reused for the others
    reused = ("pairscore_forward_tokens_total", (("kind", "reused"),))
    prompt_len = 1 + alone[0].prompt_tokens
    saved = after[reused] - before.get(reused, 0.0)
    # at least the prompt for every candidate but the first; the engine's prefix trie may
    # also share the first tokens two responses have in common
    assert (
        prompt_len * (len(RESPONSES) - 1)
        <= saved
        <= prompt_len * (len(RESPONSES) - 1) + sum(s.response_tokens for s in alone)
    )
    pairs = ("pairscore_pairs_total", (("outcome", "ok"),))
    assert after[pairs] - before.get(pairs, 0.0) == len(RESPONSES)
    ok = ("pairscore_requests_total", (("code", "OK"), ("method", "ScoreCandidates")))
    assert after[ok] == 1


def test_score_responses_with_options_and_token_detail(server) -> None:
    options = ScoreOptions(return_tokens=True, unconditional=True, greedy=True)
    with server.client() as client:
        alone = _scores(
            client.score(
                [Pair(PROMPT, r) for r in RESPONSES], return_tokens=True, unconditional=True, greedy=True
            )
        )
        got = _scores(client.score_responses(PROMPT, RESPONSES, options=options))
        with pytest.raises(ValueError, match="not both"):
            client.score_responses(PROMPT, RESPONSES, options=options, top_k=2)
    for a, b in zip(got, alone, strict=True):
        _same(a, b)
        assert a.unconditional_logprob == pytest.approx(b.unconditional_logprob, abs=TOL)
        assert a.response_is_greedy == b.response_is_greedy
        assert [t.token_id for t in a.tokens] == [t.token_id for t in b.tokens]
        assert [(t.char_start, t.char_end, t.side) for t in a.tokens] == [
            (t.char_start, t.char_end, t.side) for t in b.tokens
        ]


def test_many_sets_bad_items_fail_alone(server) -> None:
    with server.client() as client:
        info = client.model_info()
        too_long = "x" * (info.max_text_chars + 1)
        sets = [
            CandidateSet(
                prompt="Question: 2+2? Answer:", id="math", candidates=(Candidate(" 4"), Candidate(" 5"))
            ),
            # a prompt over max_text_chars: every candidate of the set gets the item error
            CandidateSet(
                prompt=too_long, id="long", candidates=(Candidate(" a"), Candidate(" b"), Candidate(" c"))
            ),
            CandidateSet(prompt="empty set", id="none", candidates=()),
            # one bad candidate among good ones
            CandidateSet(
                prompt=PROMPT,
                id="mixed",
                candidates=(Candidate(" ok", id="good"), Candidate(too_long, id="bad")),
            ),
        ]
        results = client.score_candidates(sets)
        alone = _scores(
            client.score(
                [
                    Pair("Question: 2+2? Answer:", " 4"),
                    Pair("Question: 2+2? Answer:", " 5"),
                    Pair(PROMPT, " ok"),
                ]
            )
        )
        assert client.health() == "SERVING"
    assert [r.id for r in results] == ["math", "long", "none", "mixed"]
    _same(results[0].results[0], alone[0])
    _same(results[0].results[1], alone[1])
    assert len(results[1].results) == 3
    for e in results[1].results:
        assert isinstance(e, ItemError) and e.code is ItemErrorCode.INVALID_ARGUMENT
        assert "prompt has" in e.message and "max_text_chars" in e.message
    assert results[2].results == ()
    good, bad = results[3].results
    _same(good, alone[2])
    assert good.id == "good"
    assert isinstance(bad, ItemError) and bad.id == "bad" and "response has" in bad.message


def test_candidate_limit_counts_all_sets(start_server, tiny_engine) -> None:
    st = start_server(tiny_engine, max_pairs_per_request=4)
    sets = [CandidateSet(prompt=f"p{i}", candidates=(Candidate(" a"), Candidate(" b"))) for i in range(3)]
    with st.client() as client:
        with pytest.raises(InvalidArgumentError, match="6 candidates in 3 sets.*at most 4 candidates"):
            client.score_candidates(sets)
        # four candidates in two sets fit
        assert len(client.score_candidates(sets[:2])) == 2
    samples = metric_samples(st.metrics_text())
    assert samples[("pairscore_rejected_pairs_total", (("reason", "request_limit"),))] == 6
    assert (
        samples[("pairscore_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "ScoreCandidates")))]
        == 1
    )


def test_response_size_bound_covers_candidates_and_set_ids(start_server, tiny_engine) -> None:
    st = start_server(tiny_engine, max_response_bytes=4096)
    responses = [" the quick brown fox jumps"] * 8
    with st.client() as client:
        with pytest.raises(InvalidArgumentError, match="max_response_bytes.*return_tokens"):
            client.score_responses(PROMPT, responses, return_tokens=True)
        assert len(_scores(client.score_responses(PROMPT, responses[:2]))) == 2
        # the results alone fit; the sets' ids (echoed in each CandidateSetResult) do not
        sets = [
            CandidateSet(prompt=PROMPT, id=str(i) * 2100, candidates=(Candidate(" a"),)) for i in range(2)
        ]
        with pytest.raises(InvalidArgumentError, match="max_response_bytes"):
            client.score_candidates(sets)
        assert len(client.score_candidates(sets[:1])) == 1


def test_bad_enum_is_invalid_argument_and_auth_covers_the_method(start_server, tiny_engine) -> None:
    from pairscore.v1 import scoring_pb2 as pb
    from pairscore.v1 import scoring_pb2_grpc as pb_grpc

    st = start_server(tiny_engine, auth_tokens=("sesame",))
    request = pb.ScoreCandidatesRequest(
        sets=[pb.CandidateSet(prompt="x", candidates=[pb.Candidate(response=" y")])],
        options=pb.ScoreOptions(truncation=99),
    )
    with grpc.insecure_channel(st.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ScoreCandidates(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as bad:
            stub.ScoreCandidates(request, timeout=10, metadata=(("authorization", "Bearer sesame"),))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with st.client() as client, pytest.raises(UnauthenticatedError):
        client.score_responses("x", [" y"])
    with st.client(token="sesame") as client:
        assert len(_scores(client.score_responses("x", [" y", " z"]))) == 2


def test_async_client_twins(server) -> None:
    async def main():
        async with AsyncScoringClient(server.target, timeout=20) as client:
            one = await client.score_responses(PROMPT, RESPONSES[:2])
            sets = await client.score_candidates(
                [CandidateSet(prompt=PROMPT, candidates=(Candidate(RESPONSES[1]),))]
            )
            alone = await client.score([Pair(PROMPT, RESPONSES[1])])
            return one, sets, alone

    one, sets, alone = asyncio.run(main())
    _same(_scores(one)[1], alone[0])
    _same(sets[0].results[0], alone[0])


def test_client_refuses_what_is_not_a_candidate_set(server) -> None:
    with server.client() as client:
        with pytest.raises(TypeError, match="CandidateSet"):
            client.score_candidates([(PROMPT, [" a"])])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="token ids"):
            client.score_responses(PROMPT, [1.5])  # type: ignore[list-item]


# --- prompt forms that need the engine's input support (branch `inputs`) -------------------


def test_ids_prompt_candidates_equal_separate_pairs(server, tiny_engine) -> None:
    tok = tiny_engine.tokenizer
    prompt_ids = tuple(tok(PROMPT, add_special_tokens=False)["input_ids"])
    response_ids = [tuple(tok(r, add_special_tokens=False)["input_ids"]) for r in RESPONSES[:3]]
    with server.client() as client:
        alone = [client.score([Pair(prompt_ids=prompt_ids, response_ids=r)])[0] for r in response_ids]
        if isinstance(alone[0], ItemError) or alone[0].prompt_tokens != len(prompt_ids):
            pytest.skip("the engine does not score Pair.prompt_ids/response_ids yet (branch inputs)")
        got = client.score_responses(prompt_ids, [list(r) for r in response_ids])
        vocab = client.model_info().vocab_size
        bad = client.score_candidates(
            [
                CandidateSet(prompt_ids=(0, vocab + 5), candidates=(Candidate(" a"), Candidate(" b"))),
                CandidateSet(prompt_ids=prompt_ids, candidates=(Candidate(response_ids=response_ids[0]),)),
                # two prompt forms in one set
                CandidateSet(prompt="text", prompt_ids=(1, 2), id="twice", candidates=(Candidate(" y"),)),
            ]
        )
    for a, b in zip(_scores(got), _scores(alone), strict=True):
        _same(a, b)
    for e in bad[0].results:
        assert (
            isinstance(e, ItemError)
            and e.code is ItemErrorCode.INVALID_ARGUMENT
            and str(vocab + 5) in e.message
        )
    _same(bad[1].results[0], alone[0])
    [twice] = bad[2].results
    assert isinstance(twice, ItemError) and twice.code is ItemErrorCode.INVALID_ARGUMENT
    assert "given twice" in twice.message


def test_truncation_that_cannot_fit_fails_its_candidate_only(start_server, tiny_engine) -> None:
    st = start_server(tiny_engine, max_item_tokens=40)
    options = ScoreOptions(truncation=Truncation.LEFT)
    with st.client() as client:
        got = client.score_responses(PROMPT * 4, [" ok", " word" * 60], options=options)
    short, long = got
    if isinstance(short, ItemError):
        pytest.skip(f"the engine does not truncate yet (branch inputs): {short.message}")
    assert short.prompt_tokens_dropped > 0
    assert isinstance(long, ItemError) and long.code is ItemErrorCode.INVALID_ARGUMENT


def test_cli_query_candidates(server, capsys) -> None:
    import json

    from pairscore import cli

    code = cli.main(
        ["query", "--candidates", PROMPT, *RESPONSES[:3], "--target", server.target, "--timeout", "20"]
    )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with server.client() as client:
        want = _scores([client.score([Pair(PROMPT, r)])[0] for r in RESPONSES[:3]])
    assert [line["index"] for line in lines] == [0, 1, 2]
    for line, w in zip(lines, want, strict=True):
        assert line["conditional_logprob"] == pytest.approx(w.conditional_logprob, abs=TOL)
    with pytest.raises(SystemExit):
        cli.main(["query", "--candidates", PROMPT, "--target", server.target])


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_messages_prompt_candidates_equal_separate_pairs_and_bad_conversations_fail_alone(
    start_server, gpt2_family
) -> None:
    import copy

    from harness.models import make_engine

    model, tokenizer = gpt2_family
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML
    st = start_server(make_engine(model, chat_tokenizer))
    chat = (ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?"))
    with st.client() as client:
        if not client.model_info().chat_template:
            pytest.skip("the engine does not render chat templates yet (branch inputs: chat support)")
        alone = _scores(
            [client.score([Pair(prompt_messages=chat, response=r)])[0] for r in (" Paris.", " Rome.")]
        )
        results = client.score_candidates(
            [
                CandidateSet(prompt_messages=chat, candidates=(Candidate(" Paris."), Candidate(" Rome."))),
                CandidateSet(
                    prompt_messages=(ChatMessage("robot", "beep"),), candidates=(Candidate(" a"),) * 2
                ),
                CandidateSet(prompt_messages=(), candidates=(Candidate(" a"),)),
                CandidateSet(prompt="plain text", candidates=(Candidate(" b"),)),
            ]
        )
    for got, want in zip(_scores(results[0].results), alone, strict=True):
        _same(got, want)
    for e in results[1].results:
        assert isinstance(e, ItemError) and e.code is ItemErrorCode.INVALID_ARGUMENT and "robot" in e.message
    [empty] = results[2].results
    assert isinstance(empty, ItemError) and empty.code is ItemErrorCode.INVALID_ARGUMENT
    _scores(results[3].results)
