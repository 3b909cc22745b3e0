"""The one place where protobuf messages and plain dataclasses meet.

Both the client and the server's servicer convert through these functions,
so the wire format and the Python types cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pairscore.types import (
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    PairScore,
    PrefixPolicy,
    ScoreOptions,
    ScoreOutcome,
    Side,
    TokenAlternative,
    TokenizationMode,
    TokenScore,
)
from pairscore.v1 import scoring_pb2 as pb

_TOKENIZATION_TO_PB = {
    TokenizationMode.SEPARATE: pb.TOKENIZATION_MODE_SEPARATE,
    TokenizationMode.JOINT: pb.TOKENIZATION_MODE_JOINT,
}
_TOKENIZATION_FROM_PB = {v: k for k, v in _TOKENIZATION_TO_PB.items()}
_TOKENIZATION_FROM_PB[pb.TOKENIZATION_MODE_UNSPECIFIED] = TokenizationMode.SEPARATE

_PREFIX_TO_PB = {
    PrefixPolicy.BOS: pb.PREFIX_POLICY_BOS,
    PrefixPolicy.DOCUMENT_SEPARATOR: pb.PREFIX_POLICY_DOCUMENT_SEPARATOR,
    PrefixPolicy.CUSTOM: pb.PREFIX_POLICY_CUSTOM,
}
_PREFIX_FROM_PB = {v: k for k, v in _PREFIX_TO_PB.items()}

_SIDE_TO_PB = {Side.PROMPT: pb.SIDE_PROMPT, Side.RESPONSE: pb.SIDE_RESPONSE}
_SIDE_FROM_PB = {v: k for k, v in _SIDE_TO_PB.items()}

_ERROR_TO_PB = {
    ItemErrorCode.INVALID_ARGUMENT: pb.ITEM_ERROR_CODE_INVALID_ARGUMENT,
    ItemErrorCode.CONTEXT_LENGTH_EXCEEDED: pb.ITEM_ERROR_CODE_CONTEXT_LENGTH_EXCEEDED,
    ItemErrorCode.RESOURCE_EXHAUSTED: pb.ITEM_ERROR_CODE_RESOURCE_EXHAUSTED,
    ItemErrorCode.DEADLINE_EXCEEDED: pb.ITEM_ERROR_CODE_DEADLINE_EXCEEDED,
    ItemErrorCode.INTERNAL: pb.ITEM_ERROR_CODE_INTERNAL,
}
_ERROR_FROM_PB = {v: k for k, v in _ERROR_TO_PB.items()}


class ConversionError(ValueError):
    """A message holds a value that has no meaning in this version of the API."""


def _lookup(table: dict, value, what: str):
    try:
        return table[value]
    except KeyError:
        raise ConversionError(f"unknown {what} value {value!r}") from None


# --- requests -----------------------------------------------------------------


def request_to_pb(pairs: Iterable[Pair], options: ScoreOptions) -> pb.ScoreRequest:
    """Build a ScoreRequest message from pairs and options."""
    return pb.ScoreRequest(
        pairs=[pb.Pair(id=p.id, prompt=p.prompt, response=p.response) for p in pairs],
        options=pb.ScoreOptions(
            tokenization=_TOKENIZATION_TO_PB[options.tokenization],
            return_tokens=options.return_tokens,
            unconditional=options.unconditional,
            greedy=options.greedy,
            top_k=options.top_k,
        ),
    )


def request_from_pb(msg: pb.ScoreRequest) -> tuple[list[Pair], ScoreOptions]:
    """Read pairs and options from a ScoreRequest; raises ConversionError on unknown enums."""
    options = ScoreOptions(
        tokenization=_lookup(_TOKENIZATION_FROM_PB, msg.options.tokenization, "tokenization"),
        return_tokens=msg.options.return_tokens,
        unconditional=msg.options.unconditional,
        greedy=msg.options.greedy,
        top_k=msg.options.top_k,
    )
    pairs = [Pair(prompt=p.prompt, response=p.response, id=p.id) for p in msg.pairs]
    return pairs, options


# --- responses ----------------------------------------------------------------


def _token_to_pb(t: TokenScore) -> pb.TokenScore:
    return pb.TokenScore(
        token_id=t.token_id,
        text=t.text,
        logprob=t.logprob,
        side=_SIDE_TO_PB[t.side],
        char_start=t.char_start,
        char_end=t.char_end,
        straddles_boundary=t.straddles_boundary,
        rank=t.rank,
        top_k=[pb.TokenAlternative(token_id=a.token_id, text=a.text, logprob=a.logprob) for a in t.top_k],
    )


def _token_from_pb(t: pb.TokenScore) -> TokenScore:
    return TokenScore(
        token_id=t.token_id,
        text=t.text,
        logprob=t.logprob,
        side=_lookup(_SIDE_FROM_PB, t.side, "side"),
        char_start=t.char_start,
        char_end=t.char_end,
        straddles_boundary=t.straddles_boundary,
        rank=t.rank,
        top_k=tuple(TokenAlternative(a.token_id, a.text, a.logprob) for a in t.top_k),
    )


def result_to_pb(index: int, outcome: ScoreOutcome) -> pb.ScoreResult:
    """Build one ScoreResult message from a PairScore or ItemError."""
    if isinstance(outcome, ItemError):
        return pb.ScoreResult(
            id=outcome.id,
            index=index,
            error=pb.ItemError(code=_ERROR_TO_PB[outcome.code], message=outcome.message),
        )
    scores = pb.PairScores(
        joint_logprob=outcome.joint_logprob,
        prompt_logprob=outcome.prompt_logprob,
        conditional_logprob=outcome.conditional_logprob,
        prompt_tokens=outcome.prompt_tokens,
        response_tokens=outcome.response_tokens,
        boundary_straddled=outcome.boundary_straddled,
        tokens=[_token_to_pb(t) for t in outcome.tokens],
    )
    # Optional fields stay unset (absent on the wire) unless the request asked for them.
    if outcome.unconditional_logprob is not None:
        scores.unconditional_logprob = outcome.unconditional_logprob
    if outcome.pmi is not None:
        scores.pmi = outcome.pmi
    if outcome.ifd is not None:
        scores.ifd = outcome.ifd
    if outcome.response_is_greedy is not None:
        scores.response_is_greedy = outcome.response_is_greedy
    return pb.ScoreResult(id=outcome.id, index=index, scores=scores)


def response_to_pb(outcomes: Sequence[ScoreOutcome]) -> pb.ScoreResponse:
    """Build a ScoreResponse message from outcomes in request order."""
    return pb.ScoreResponse(results=[result_to_pb(i, o) for i, o in enumerate(outcomes)])


def result_from_pb(msg: pb.ScoreResult) -> ScoreOutcome:
    """Read one ScoreResult message into a PairScore or an ItemError."""
    which = msg.WhichOneof("outcome")
    if which == "error":
        return ItemError(
            code=_lookup(_ERROR_FROM_PB, msg.error.code, "item error code"),
            message=msg.error.message,
            id=msg.id,
        )
    if which != "scores":
        raise ConversionError(f"result {msg.index} carries neither scores nor an error")
    s = msg.scores
    return PairScore(
        joint_logprob=s.joint_logprob,
        prompt_logprob=s.prompt_logprob,
        conditional_logprob=s.conditional_logprob,
        prompt_tokens=s.prompt_tokens,
        response_tokens=s.response_tokens,
        boundary_straddled=s.boundary_straddled,
        tokens=tuple(_token_from_pb(t) for t in s.tokens),
        id=msg.id,
        unconditional_logprob=s.unconditional_logprob if s.HasField("unconditional_logprob") else None,
        pmi=s.pmi if s.HasField("pmi") else None,
        ifd=s.ifd if s.HasField("ifd") else None,
        response_is_greedy=s.response_is_greedy if s.HasField("response_is_greedy") else None,
    )


def response_from_pb(msg: pb.ScoreResponse) -> list[ScoreOutcome]:
    """Read a ScoreResponse message into outcomes in request order."""
    return [result_from_pb(r) for r in msg.results]


# --- model info ---------------------------------------------------------------


def model_info_to_pb(info: ModelInfo) -> pb.GetModelInfoResponse:
    """Build a GetModelInfoResponse message from a ModelInfo."""
    return pb.GetModelInfoResponse(
        model_name=info.model_name,
        model_source=info.model_source,
        revision=info.revision,
        dtype=info.dtype,
        device=info.device,
        max_context_tokens=info.max_context_tokens,
        vocab_size=info.vocab_size,
        prefix_policy=_PREFIX_TO_PB[info.prefix_policy],
        prefix_token_id=info.prefix_token_id,
        prefix_token=info.prefix_token,
        tokenizer_class=info.tokenizer_class,
        server_version=info.server_version,
        default_tokenization=_TOKENIZATION_TO_PB[info.default_tokenization],
        architecture=info.architecture,
        max_pairs_per_request=info.max_pairs_per_request,
        max_text_chars=info.max_text_chars,
        max_item_tokens=info.max_item_tokens,
        max_message_bytes=info.max_message_bytes,
        max_queue_tokens=info.max_queue_tokens,
        max_top_k=info.max_top_k,
        tokenizer_normalizes=info.tokenizer_normalizes,
    )


def model_info_from_pb(msg: pb.GetModelInfoResponse) -> ModelInfo:
    """Read a GetModelInfoResponse message into a ModelInfo."""
    return ModelInfo(
        model_name=msg.model_name,
        model_source=msg.model_source,
        revision=msg.revision,
        dtype=msg.dtype,
        device=msg.device,
        max_context_tokens=msg.max_context_tokens,
        vocab_size=msg.vocab_size,
        prefix_policy=_lookup(_PREFIX_FROM_PB, msg.prefix_policy, "prefix policy"),
        prefix_token_id=msg.prefix_token_id,
        prefix_token=msg.prefix_token,
        tokenizer_class=msg.tokenizer_class,
        server_version=msg.server_version,
        default_tokenization=_lookup(_TOKENIZATION_FROM_PB, msg.default_tokenization, "tokenization"),
        architecture=msg.architecture,
        max_pairs_per_request=msg.max_pairs_per_request,
        max_text_chars=msg.max_text_chars,
        max_item_tokens=msg.max_item_tokens,
        max_message_bytes=msg.max_message_bytes,
        max_queue_tokens=msg.max_queue_tokens,
        max_top_k=msg.max_top_k,
        tokenizer_normalizes=msg.tokenizer_normalizes,
    )


#: Upper bounds of the encoded size of a ScoreResponse's parts, in bytes (field tags,
#: varints at their widest, doubles, the length prefixes of nested messages).
_RESULT_BYTES = 80  # a ScoreResult with its PairScores or ItemError, without id / tokens / message
_TOKEN_BYTES = 40  # a TokenScore without its text
_PARTIAL_UTF8_BYTES = 3  # a token cut inside a character decodes to U+FFFD
_SELECTION_BYTES = 3 * 9 + 2  # unconditional_logprob, pmi, ifd (tag + double), response_is_greedy
_RANK_BYTES = 6  # TokenScore.rank: tag + int32 varint
_ALTERNATIVE_BYTES = 2 + 6 + 2 + 9  # one TokenAlternative: length prefix, id, text tag+length, logprob


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
