"""The one place where protobuf messages and plain dataclasses meet.

Both the client and the server's servicer convert through these functions,
so the wire format and the Python types cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pairscore.types import (
    Candidate,
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    EndOfTurn,
    ItemError,
    ItemErrorCode,
    ModelInfo,
    Pair,
    PairScore,
    PrefixMode,
    PrefixPolicy,
    ScoreOptions,
    ScoreOutcome,
    Side,
    TokenAlternative,
    TokenizationMode,
    TokenScore,
    Truncation,
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

_END_OF_TURN_TO_PB = {
    EndOfTurn.INCLUDED: pb.END_OF_TURN_INCLUDED,
    EndOfTurn.EXCLUDED: pb.END_OF_TURN_EXCLUDED,
}
_END_OF_TURN_FROM_PB = {v: k for k, v in _END_OF_TURN_TO_PB.items()}
_END_OF_TURN_FROM_PB[pb.END_OF_TURN_UNSPECIFIED] = EndOfTurn.INCLUDED

_TRUNCATION_TO_PB = {Truncation.NONE: pb.TRUNCATION_NONE, Truncation.LEFT: pb.TRUNCATION_LEFT}
_TRUNCATION_FROM_PB = {v: k for k, v in _TRUNCATION_TO_PB.items()}
_TRUNCATION_FROM_PB[pb.TRUNCATION_UNSPECIFIED] = Truncation.NONE

_PREFIX_MODE_TO_PB = {PrefixMode.SERVER: pb.PREFIX_MODE_SERVER, PrefixMode.NONE: pb.PREFIX_MODE_NONE}
_PREFIX_MODE_FROM_PB = {v: k for k, v in _PREFIX_MODE_TO_PB.items()}
_PREFIX_MODE_FROM_PB[pb.PREFIX_MODE_UNSPECIFIED] = PrefixMode.SERVER

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


def _ids_to_pb(ids: Sequence[int] | None) -> pb.TokenIds | None:
    return None if ids is None else pb.TokenIds(ids=ids)


def _ids_from_pb(msg, field: str) -> tuple[int, ...] | None:
    return tuple(getattr(msg, field).ids) if msg.HasField(field) else None


def _messages_to_pb(messages: Sequence[ChatMessage] | None) -> pb.Conversation | None:
    if messages is None:
        return None
    return pb.Conversation(messages=[pb.ChatMessage(role=m.role, content=m.content) for m in messages])


def _messages_from_pb(msg) -> tuple[ChatMessage, ...] | None:
    if not msg.HasField("prompt_messages"):
        return None
    return tuple(ChatMessage(m.role, m.content) for m in msg.prompt_messages.messages)


def pair_to_pb(p: Pair) -> pb.Pair:
    """Build one Pair message (the forms that are ``None`` stay unset)."""
    return pb.Pair(
        id=p.id,
        prompt=p.prompt,
        response=p.response,
        prompt_messages=_messages_to_pb(p.prompt_messages),
        prompt_ids=_ids_to_pb(p.prompt_ids),
        response_ids=_ids_to_pb(p.response_ids),
    )


def pair_from_pb(p: pb.Pair) -> Pair:
    """Read one Pair message."""
    return Pair(
        prompt=p.prompt,
        response=p.response,
        id=p.id,
        prompt_messages=_messages_from_pb(p),
        prompt_ids=_ids_from_pb(p, "prompt_ids"),
        response_ids=_ids_from_pb(p, "response_ids"),
    )


def options_to_pb(options: ScoreOptions) -> pb.ScoreOptions:
    """Build a ScoreOptions message."""
    return pb.ScoreOptions(
        tokenization=_TOKENIZATION_TO_PB[options.tokenization],
        return_tokens=options.return_tokens,
        unconditional=options.unconditional,
        greedy=options.greedy,
        top_k=options.top_k,
        end_of_turn=_END_OF_TURN_TO_PB[options.end_of_turn],
        truncation=_TRUNCATION_TO_PB[options.truncation],
        prefix=_PREFIX_MODE_TO_PB[options.prefix],
    )


def options_from_pb(msg: pb.ScoreOptions) -> ScoreOptions:
    """Read a ScoreOptions message; raises ConversionError on unknown enums."""
    return ScoreOptions(
        tokenization=_lookup(_TOKENIZATION_FROM_PB, msg.tokenization, "tokenization"),
        return_tokens=msg.return_tokens,
        unconditional=msg.unconditional,
        greedy=msg.greedy,
        top_k=msg.top_k,
        end_of_turn=_lookup(_END_OF_TURN_FROM_PB, msg.end_of_turn, "end_of_turn"),
        truncation=_lookup(_TRUNCATION_FROM_PB, msg.truncation, "truncation"),
        prefix=_lookup(_PREFIX_MODE_FROM_PB, msg.prefix, "prefix"),
    )


def request_to_pb(pairs: Iterable[Pair], options: ScoreOptions) -> pb.ScoreRequest:
    """Build a ScoreRequest message from pairs and options."""
    return pb.ScoreRequest(pairs=[pair_to_pb(p) for p in pairs], options=options_to_pb(options))


def request_from_pb(msg: pb.ScoreRequest) -> tuple[list[Pair], ScoreOptions]:
    """Read pairs and options from a ScoreRequest; raises ConversionError on unknown enums."""
    return [pair_from_pb(p) for p in msg.pairs], options_from_pb(msg.options)


def candidates_request_to_pb(
    sets: Iterable[CandidateSet], options: ScoreOptions
) -> pb.ScoreCandidatesRequest:
    """Build a ScoreCandidatesRequest message from candidate sets and options."""
    return pb.ScoreCandidatesRequest(
        sets=[
            pb.CandidateSet(
                id=s.id,
                prompt=s.prompt,
                prompt_messages=_messages_to_pb(s.prompt_messages),
                prompt_ids=_ids_to_pb(s.prompt_ids),
                candidates=[
                    pb.Candidate(id=c.id, response=c.response, response_ids=_ids_to_pb(c.response_ids))
                    for c in s.candidates
                ],
            )
            for s in sets
        ],
        options=options_to_pb(options),
    )


def candidates_request_from_pb(msg: pb.ScoreCandidatesRequest) -> tuple[list[CandidateSet], ScoreOptions]:
    """Read candidate sets and options from a ScoreCandidatesRequest; raises ConversionError
    on unknown enums."""
    sets = [
        CandidateSet(
            candidates=tuple(
                Candidate(response=c.response, id=c.id, response_ids=_ids_from_pb(c, "response_ids"))
                for c in s.candidates
            ),
            prompt=s.prompt,
            id=s.id,
            prompt_messages=_messages_from_pb(s),
            prompt_ids=_ids_from_pb(s, "prompt_ids"),
        )
        for s in msg.sets
    ]
    return sets, options_from_pb(msg.options)


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
    scores.prompt_tokens_dropped = outcome.prompt_tokens_dropped
    scores.rendered_prompt = outcome.rendered_prompt
    scores.rendered_response = outcome.rendered_response
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
        prompt_tokens_dropped=s.prompt_tokens_dropped,
        rendered_prompt=s.rendered_prompt,
        rendered_response=s.rendered_response,
    )


def response_from_pb(msg: pb.ScoreResponse) -> list[ScoreOutcome]:
    """Read a ScoreResponse message into outcomes in request order."""
    return [result_from_pb(r) for r in msg.results]


def candidates_response_to_pb(results: Sequence[CandidateSetResult]) -> pb.ScoreCandidatesResponse:
    """Build a ScoreCandidatesResponse message from per-set results in request order."""
    return pb.ScoreCandidatesResponse(
        sets=[
            pb.CandidateSetResult(
                id=r.id, index=i, results=[result_to_pb(j, o) for j, o in enumerate(r.results)]
            )
            for i, r in enumerate(results)
        ]
    )


def candidates_response_from_pb(msg: pb.ScoreCandidatesResponse) -> list[CandidateSetResult]:
    """Read a ScoreCandidatesResponse message into per-set results in request order."""
    return [
        CandidateSetResult(results=tuple(result_from_pb(r) for r in s.results), id=s.id) for s in msg.sets
    ]


def tokenize_request_to_pb(texts: Iterable[str], *, parse_special_tokens: bool = False) -> pb.TokenizeRequest:
    """Build a TokenizeRequest message."""
    return pb.TokenizeRequest(texts=list(texts), parse_special_tokens=parse_special_tokens)


def tokenize_request_from_pb(msg: pb.TokenizeRequest) -> tuple[list[str], bool]:
    """Read the texts and ``parse_special_tokens`` of a TokenizeRequest message."""
    return list(msg.texts), msg.parse_special_tokens


def tokenize_response_to_pb(ids: Iterable[Sequence[int]]) -> pb.TokenizeResponse:
    """Build a TokenizeResponse message from each text's ids."""
    return pb.TokenizeResponse(tokens=[pb.TokenIds(ids=i) for i in ids])


def tokenize_response_from_pb(msg: pb.TokenizeResponse) -> list[tuple[int, ...]]:
    """Read each text's ids from a TokenizeResponse message."""
    return [tuple(t.ids) for t in msg.tokens]


@dataclass(frozen=True)
class RenderChatArgs:
    """What a RenderChatRequest asks: the conversation and how to render it."""

    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    include_template: bool = False


def render_chat_request_to_pb(args: RenderChatArgs) -> pb.RenderChatRequest:
    """Build a RenderChatRequest message."""
    return pb.RenderChatRequest(
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in args.messages],
        add_generation_prompt=args.add_generation_prompt,
        continue_final_message=args.continue_final_message,
        include_template=args.include_template,
    )


def render_chat_request_from_pb(msg: pb.RenderChatRequest) -> RenderChatArgs:
    """Read a RenderChatRequest message."""
    return RenderChatArgs(
        messages=tuple(ChatMessage(m.role, m.content) for m in msg.messages),
        add_generation_prompt=msg.add_generation_prompt,
        continue_final_message=msg.continue_final_message,
        include_template=msg.include_template,
    )


def render_chat_response_to_pb(text: str, template: str = "") -> pb.RenderChatResponse:
    """Build a RenderChatResponse message: the rendered text and, when asked, the template."""
    return pb.RenderChatResponse(text=text, template=template)


def render_chat_response_from_pb(msg: pb.RenderChatResponse) -> tuple[str, str]:
    """Read (text, template) from a RenderChatResponse message."""
    return msg.text, msg.template


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
        max_request_chars=info.max_request_chars,
        max_preparing_chars=info.max_preparing_chars,
        max_response_bytes=info.max_response_bytes,
        tokenizer_normalizes=info.tokenizer_normalizes,
        chat_template=info.chat_template,
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
        max_request_chars=msg.max_request_chars,
        max_preparing_chars=msg.max_preparing_chars,
        max_response_bytes=msg.max_response_bytes,
        tokenizer_normalizes=msg.tokenizer_normalizes,
        chat_template=msg.chat_template,
    )
