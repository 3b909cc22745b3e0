"""How large a gRPC answer can be, bounded before scoring: the ScoreResponse's wire sizes.

The service refuses a request whose answer could be over
``max_response_bytes`` before any scoring (service.py); it knows no wire
format, so the servicer hands it the :class:`~pairscore_server.answer_bound.AnswerBound`
(answer_bound.py) built here from the encoded size of a ScoreResponse's parts:
:func:`score_response_bound` for Score and ScoreStream,
:func:`candidates_response_bound` for ScoreCandidates (each set's wrapper
too). :func:`result_bytes_bound` is one result's share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pairscore.types import CandidateSet, ItemError, Pair, ScoreOptions
from pairscore_server.answer_bound import AnswerBound

if TYPE_CHECKING:
    from pairscore_server.engine import PreparedPair

#: Upper bounds of the encoded size of a ScoreResponse's parts, in bytes (field tags,
#: varints at their widest, doubles, the length prefixes of nested messages).
_RESULT_BYTES = 80  # a ScoreResult with its PairScores or ItemError, without id / tokens / message
_TOKEN_BYTES = 40  # a TokenScore without its text
_PARTIAL_UTF8_BYTES = 3  # a token cut inside a character decodes to U+FFFD
_SELECTION_BYTES = 3 * 9 + 2 + 6  # unconditional_logprob, pmi, ifd (tag + double), response_is_greedy,
# prompt_tokens_dropped (tag + int32 varint)
_RANK_BYTES = 6  # TokenScore.rank: tag + int32 varint
_ALTERNATIVE_BYTES = 2 + 6 + 2 + 9  # one TokenAlternative: length prefix, id, text tag+length, logprob

#: An upper bound of a CandidateSetResult's size besides its id and results: its tag and
#: length prefix in the response, the id's tag and length, the index's tag and varint.
_SET_RESULT_BYTES = 1 + 5 + 1 + 5 + 1 + 5


def result_bytes_bound(
    *,
    id: str,
    tokens: int = 0,
    text_bytes: int = 0,
    message: str = "",
    top_k: int = 0,
    max_token_text_bytes: int = 0,
) -> int:
    """An upper bound of one result's size in a ScoreResponse.

    ``tokens``: the per-token detail it carries (0 without ``return_tokens``);
    ``text_bytes``: the UTF-8 size of the texts those tokens come from.
    ``message``: an item error's message. ``top_k``: alternatives per token;
    each one's text is at most ``max_token_text_bytes`` (the longest token of
    the vocabulary, decoded). Rank and the data-selection scores are always
    counted (a few bytes).
    """
    size = _RESULT_BYTES + _SELECTION_BYTES + len(id.encode()) + len(message.encode())
    if tokens:
        size += tokens * (_TOKEN_BYTES + _RANK_BYTES + _PARTIAL_UTF8_BYTES) + text_bytes
        size += tokens * top_k * (_ALTERNATIVE_BYTES + max_token_text_bytes)
    return size


def error_result_bytes(pair: Pair, error: ItemError) -> int:
    """A bound of an item error's result (its id and message)."""
    return result_bytes_bound(id=pair.id, message=error.message)


def detail_text_bytes(pair: Pair, item: PreparedPair, *, max_token_text_bytes: int) -> int:
    """A bound of the UTF-8 bytes of a result's per-token texts and rendered texts.

    Tokens of a text side decode to at most that text (plus U+FFFD, counted
    per token by :func:`result_bytes_bound`); tokens of a side given as ids
    are bounded by the longest token of the vocabulary each
    (``max_token_text_bytes``); a chat item's tokens decode to its rendered
    texts, which it also carries (``rendered_prompt`` / ``rendered_response``).
    """
    per_token = max_token_text_bytes
    if item.rendered_prompt or item.rendered_response:
        rendered = len(item.rendered_prompt.encode()) + len(item.rendered_response.encode())
        return 2 * rendered
    prompt = len(pair.prompt_ids) * per_token if pair.prompt_ids is not None else len(pair.prompt.encode())
    response = (
        len(pair.response_ids) * per_token if pair.response_ids is not None else len(pair.response.encode())
    )
    return prompt + response


def score_response_bound(
    options: ScoreOptions, *, max_token_text_bytes: int, extra_bytes: int = 0
) -> AnswerBound:
    """The bound of a ScoreResponse: each result by :func:`result_bytes_bound` (its
    per-token detail when the pair asks for it); ``max_token_text_bytes``: the served
    vocabulary's longest token (ModelInfo)."""

    def scored(pair: Pair, item: PreparedPair) -> int:
        if not item.return_tokens:
            return result_bytes_bound(id=pair.id)
        return result_bytes_bound(
            id=pair.id,
            tokens=item.prompt_tokens + item.response_tokens,
            text_bytes=detail_text_bytes(pair, item, max_token_text_bytes=max_token_text_bytes),
            top_k=item.top_k,
            max_token_text_bytes=max_token_text_bytes,
        )

    less = "leave out the per-token detail (return_tokens)" if options.return_tokens else ""
    return AnswerBound(scored=scored, refused=error_result_bytes, extra_bytes=extra_bytes, less_detail=less)


def candidates_response_bound(
    sets: Sequence[CandidateSet], options: ScoreOptions, *, max_token_text_bytes: int
) -> AnswerBound:
    """The bound of a ScoreCandidatesResponse: :func:`score_response_bound` of its
    candidates plus each set's CandidateSetResult wrapper (id, index, tags, length prefixes)."""
    wrappers = sum(len(s.id.encode()) + _SET_RESULT_BYTES for s in sets)
    return score_response_bound(options, max_token_text_bytes=max_token_text_bytes, extra_bytes=wrappers)
