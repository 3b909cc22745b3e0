"""Round trips of the input forms (chat, token ids, candidates) and the new options
through the one protobuf converter."""

from __future__ import annotations

import pytest

from pairscore import convert
from pairscore.types import (
    Candidate,
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    EndOfTurn,
    ItemError,
    ItemErrorCode,
    Pair,
    PairScore,
    PrefixMode,
    ScoreOptions,
    Truncation,
)
from pairscore.v1 import scoring_pb2 as pb

CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hi <|im_end|>"))


@pytest.mark.parametrize(
    "pair",
    [
        Pair("x", "y", id="text"),
        Pair(prompt_messages=CHAT, response="Hello!", id="chat"),
        Pair(prompt_ids=(1, 2, 3), response_ids=(4,), id="ids"),
        Pair(prompt_ids=(), response="y", id="empty ids are given"),
        Pair(prompt_messages=(), id="empty conversation is given"),
    ],
)
def test_pair_forms_round_trip(pair: Pair) -> None:
    options = ScoreOptions(end_of_turn=EndOfTurn.EXCLUDED, truncation=Truncation.LEFT, prefix=PrefixMode.NONE)
    wire = pb.ScoreRequest.FromString(convert.request_to_pb([pair], options).SerializeToString())
    assert convert.request_from_pb(wire) == ([pair], options)


def test_unset_options_mean_the_defaults() -> None:
    # An old client sends none of the new fields: the defaults apply.
    _, options = convert.request_from_pb(pb.ScoreRequest(pairs=[pb.Pair(prompt="a", response="b")]))
    assert options == ScoreOptions()
    assert (options.end_of_turn, options.truncation, options.prefix) == (
        EndOfTurn.INCLUDED,
        Truncation.NONE,
        PrefixMode.SERVER,
    )


def test_unknown_option_value_is_a_conversion_error() -> None:
    with pytest.raises(convert.ConversionError, match="truncation"):
        convert.options_from_pb(pb.ScoreOptions(truncation=99))


def test_form_problem_names_both_forms() -> None:
    assert Pair("x", "y").form_problem == ""
    assert "prompt and prompt_ids" in Pair("x", "y", prompt_ids=(1,)).form_problem
    assert "response and response_ids" in Pair("", "y", response_ids=(1,)).form_problem
    assert "prompt_messages and prompt_ids" in Pair(prompt_messages=CHAT, prompt_ids=()).form_problem


def test_candidates_round_trip_and_expand() -> None:
    sets = [
        CandidateSet((Candidate(" A", id="a"), Candidate(response_ids=(7, 8))), prompt="Q:", id="q1"),
        CandidateSet((Candidate("Hi"),), prompt_messages=CHAT, id="q2"),
    ]
    options = ScoreOptions(return_tokens=True)
    wire = pb.ScoreCandidatesRequest.FromString(
        convert.candidates_request_to_pb(sets, options).SerializeToString()
    )
    assert convert.candidates_request_from_pb(wire) == (sets, options)
    assert sets[0].pairs() == [Pair("Q:", " A", id="a"), Pair("Q:", "", response_ids=(7, 8))]
    assert sets[1].pairs() == [Pair(prompt_messages=CHAT, response="Hi")]


def test_candidate_results_round_trip() -> None:
    score = PairScore(
        -3.0, -1.0, -2.0, 2, 1, id="a", prompt_tokens_dropped=4, rendered_prompt="<x>", rendered_response="y"
    )
    error = ItemError(ItemErrorCode.INVALID_ARGUMENT, "bad", id="b")
    results = [CandidateSetResult((score, error), id="q1"), CandidateSetResult((), id="q2")]
    wire = pb.ScoreCandidatesResponse.FromString(
        convert.candidates_response_to_pb(results).SerializeToString()
    )
    assert [s.index for s in wire.sets] == [0, 1]
    assert [r.index for r in wire.sets[0].results] == [0, 1]
    assert convert.candidates_response_from_pb(wire) == results


def test_tokenize_messages_round_trip() -> None:
    request = convert.tokenize_request_to_pb(["a", "<|endoftext|>"], parse_special_tokens=True)
    assert list(request.texts) == ["a", "<|endoftext|>"] and request.parse_special_tokens
    ids = [(1, 2), ()]
    assert convert.tokenize_response_from_pb(convert.tokenize_response_to_pb(ids)) == ids
