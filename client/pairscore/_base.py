"""What the sync and the asyncio client share: inputs, options, deadlines, conversion.

Only the I/O differs between :mod:`pairscore.client` and :mod:`pairscore.aio`;
everything here is plain Python that both call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Union

import grpc
from grpc_health.v1 import health_pb2

from pairscore.channel import SCORING_SERVICE, ChannelSettings, RetryPolicy, TlsConfig
from pairscore.convert import (
    ConversionError,
    candidates_request_to_pb,
    candidates_response_from_pb,
    model_info_from_pb,
    request_to_pb,
    response_from_pb,
    tokenize_request_to_pb,
    tokenize_response_from_pb,
)
from pairscore.errors import ScoringError, error_from_rpc
from pairscore.types import (
    Candidate,
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    EndOfTurn,
    ModelInfo,
    Pair,
    PrefixMode,
    ScoreOptions,
    ScoreOutcome,
    TokenizationMode,
    Truncation,
)
from pairscore.v1 import scoring_pb2 as pb

#: A pair as the client accepts it: a Pair, or a (prompt, response) tuple.
PairLike = Union[Pair, tuple[str, str]]  # noqa: UP007 - a runtime alias on Python 3.10+

#: A prompt as score_responses accepts it: text, a conversation, or token ids.
PromptLike = Union[str, Sequence[ChatMessage], Sequence[int]]  # noqa: UP007
#: A response as score_responses accepts it: text, a Candidate, or token ids.
ResponseLike = Union[str, Candidate, Sequence[int]]  # noqa: UP007

#: Default pairs per ScoreStream message in score_iter.
DEFAULT_BATCH_SIZE = 32
#: Default batches per stream that score_iter keeps in flight.
DEFAULT_BATCHES_IN_FLIGHT = 8

_UNKNOWN = grpc.StatusCode.UNKNOWN

__all__ = [
    "DEFAULT_RETRY",
    "build_settings",
    "DEFAULT_BATCH_SIZE",
    "SCORING_SERVICE",
    "ClientCore",
    "IterSettings",
    "PairLike",
    "ScoringError",
    "error_from_rpc",
    "to_pair",
]


#: The retry policy clients use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()


def build_settings(
    target: str | ChannelSettings,
    *,
    secure: bool,
    tls: TlsConfig | bool | None,
    credentials: grpc.ChannelCredentials | None,
    token: str | None,
    retry: RetryPolicy | None,
    load_balancing: str,
    max_message_bytes: int,
    channel_options: Sequence[tuple[str, object]],
) -> ChannelSettings:
    """ChannelSettings from the clients' keyword arguments (or ``target`` if it is one)."""
    if isinstance(target, ChannelSettings):
        return target
    return ChannelSettings(
        target=target,
        tls=tls if tls is not None else (True if secure else None),
        credentials=credentials,
        token=token,
        retry=retry,
        load_balancing=load_balancing,
        max_message_bytes=max_message_bytes,
        channel_options=tuple(channel_options),
    )


def to_pair(item: PairLike) -> Pair:
    """Accept a Pair or a (prompt, response) tuple of str; TypeError for anything else.

    A missing prompt or response (``None``, or NaN from pandas) is refused
    here, before anything is sent: it used to go out as an empty text (a
    Pair) and be scored. The batch helpers (``pairscore score``,
    :mod:`pairscore.hf`, :mod:`pairscore.ray`) instead give such a row error
    ``invalid_row``; see :func:`pairscore.pipeline.columns.score_rows`.
    """
    if isinstance(item, Pair):
        prompt, response = item.prompt, item.response
    else:
        try:
            prompt, response = item
        except (TypeError, ValueError):
            raise TypeError(
                f"a pair must be a pairscore.Pair or a (prompt, response) tuple, got {item!r}"
            ) from None
    if not isinstance(prompt, str) or not isinstance(response, str):
        from pairscore.pipeline.columns import pair_problem

        raise TypeError(
            f"prompt and response must be str, got {type(prompt).__name__} and {type(response).__name__} "
            f"({pair_problem(prompt, response)}); a missing text cannot be scored: leave the pair out, "
            "or score a table with pairscore.hf / pairscore.ray / `pairscore score`, which mark it invalid_row"
        )
    return item if isinstance(item, Pair) else Pair(prompt=prompt, response=response)


def make_options(
    tokenization: TokenizationMode | str = TokenizationMode.SEPARATE,
    return_tokens: bool = False,
    unconditional: bool = False,
    greedy: bool = False,
    top_k: int = 0,
    *,
    end_of_turn: EndOfTurn | str = EndOfTurn.INCLUDED,
    truncation: Truncation | str = Truncation.NONE,
    prefix: PrefixMode | str = PrefixMode.SERVER,
) -> ScoreOptions:
    """ScoreOptions from keyword arguments; the enums may be given by value
    (``tokenization="joint"``, ``truncation="left"``, ``prefix="none"``,
    ``end_of_turn="excluded"``).

    A negative ``top_k`` raises ValueError here; one above the server's
    ``max_top_k`` is refused by the server (INVALID_ARGUMENT naming the limit).
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be a whole number >= 0, got {top_k!r}")
    return ScoreOptions(
        tokenization=TokenizationMode(tokenization),
        return_tokens=return_tokens,
        unconditional=unconditional,
        greedy=greedy,
        top_k=top_k,
        end_of_turn=EndOfTurn(end_of_turn),
        truncation=Truncation(truncation),
        prefix=PrefixMode(prefix),
    )


def resolve_options(options: ScoreOptions | None, **keywords: object) -> ScoreOptions:
    """``options`` when given (the keyword options must then be left at their defaults),
    else ScoreOptions from the keywords (:func:`make_options`)."""
    if options is None:
        return make_options(**keywords)  # type: ignore[arg-type]
    if not isinstance(options, ScoreOptions):
        raise TypeError(f"options must be a pairscore.ScoreOptions, got {type(options).__name__}")
    defaults = make_options()
    changed = [k for k, v in keywords.items() if make_options(**{k: v}) != defaults]  # type: ignore[arg-type]
    if changed:
        raise ValueError(
            f"give the options either as options=ScoreOptions(...) or as keywords, not both "
            f"(got options and {', '.join(changed)})"
        )
    return options


def _ids(value: Sequence[object], what: str) -> tuple[int, ...]:
    ids = tuple(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"{what} given as a sequence must hold token ids (int) only, got {value!r}")
    return ids  # type: ignore[return-value]


def candidate_set(prompt: PromptLike, responses: Iterable[ResponseLike], *, id: str = "") -> CandidateSet:
    """A CandidateSet from a prompt (text, a sequence of ChatMessage, or token ids) and
    responses (text, Candidate, or token ids); TypeError for anything else."""
    candidates: list[Candidate] = []
    for r in responses:
        if isinstance(r, Candidate):
            candidates.append(r)
        elif isinstance(r, str):
            candidates.append(Candidate(response=r))
        elif isinstance(r, Sequence):
            candidates.append(Candidate(response_ids=_ids(r, "a response")))
        else:
            raise TypeError(f"a response must be str, a pairscore.Candidate or token ids, got {r!r}")
    if isinstance(prompt, str):
        return CandidateSet(candidates=tuple(candidates), prompt=prompt, id=id)
    if isinstance(prompt, Sequence):
        items = tuple(prompt)
        if items and all(isinstance(m, ChatMessage) for m in items):
            return CandidateSet(candidates=tuple(candidates), prompt_messages=items, id=id)  # type: ignore[arg-type]
        return CandidateSet(candidates=tuple(candidates), prompt_ids=_ids(items, "a prompt"), id=id)
    raise TypeError(
        f"a prompt must be str, a sequence of pairscore.ChatMessage or token ids, got {type(prompt).__name__}"
    )


@dataclass(frozen=True)
class IterSettings:
    """How :meth:`score_iter` streams: batch size, pairs in flight, streams, progress deadline."""

    batch_size: int
    max_in_flight: int
    streams: int
    progress_timeout: float | None
    #: Called as ``on_retry(error, delay_s)`` when a broken stream will be reopened.
    on_retry: Callable[[ScoringError, float], None] | None = None

    @classmethod
    def build(
        cls,
        batch_size: int,
        max_in_flight: int | None,
        streams: int,
        progress_timeout: float | None,
        on_retry: Callable[[ScoringError, float], None] | None = None,
    ) -> IterSettings:
        """Validate and fill in defaults (``max_in_flight``: 8 batches per stream)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        if max_in_flight is None:
            max_in_flight = batch_size * DEFAULT_BATCHES_IN_FLIGHT * streams
        if max_in_flight < batch_size:
            raise ValueError(f"max_in_flight ({max_in_flight}) must be >= batch_size ({batch_size})")
        if progress_timeout is not None and progress_timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {progress_timeout}")
        return cls(batch_size, max_in_flight, streams, progress_timeout, on_retry)


class ClientCore:
    """Conversion, options, deadlines and error mapping for one client.

    ``timeout`` is the default deadline of each call in seconds (``None``:
    none); ``wait_for_ready`` makes calls wait for a connection instead of
    failing at once while no server is reachable.
    """

    def __init__(self, settings: ChannelSettings, *, timeout: float | None, wait_for_ready: bool) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 or None, got {timeout}")
        self.settings = settings
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata = settings.call_metadata()

    def deadline(self, timeout: float | None) -> float | None:
        """The per-call ``timeout`` if given, else the client's default."""
        return self.timeout if timeout is None else timeout

    def call_kwargs(self, timeout: float | None, wait_for_ready: bool | None = None) -> dict[str, object]:
        """Keyword arguments for a unary gRPC call (``wait_for_ready``: override the client's)."""
        return {
            "timeout": self.deadline(timeout),
            "metadata": self.metadata,
            "wait_for_ready": self.wait_for_ready if wait_for_ready is None else wait_for_ready,
        }

    def stream_kwargs(self) -> dict[str, object]:
        """Keyword arguments for a ScoreStream call of score_iter (no overall deadline)."""
        return {"metadata": self.metadata, "wait_for_ready": self.wait_for_ready}

    @staticmethod
    def request(pairs: Iterable[PairLike], options: ScoreOptions) -> pb.ScoreRequest:
        """The ScoreRequest for ``pairs``."""
        return request_to_pb([to_pair(p) for p in pairs], options)

    @staticmethod
    def outcomes(response: pb.ScoreResponse, expected: int | None = None) -> list[ScoreOutcome]:
        """The outcomes of a ScoreResponse; checks that it answers ``expected`` pairs."""
        try:
            outcomes = response_from_pb(response)
        except ConversionError as exc:
            raise ScoringError(_UNKNOWN, f"cannot read the server's answer: {exc}") from exc
        if expected is not None and len(outcomes) != expected:
            raise ScoringError(_UNKNOWN, f"the server answered {len(outcomes)} results for {expected} pairs")
        return outcomes

    @staticmethod
    def candidates_request(sets: Sequence[CandidateSet], options: ScoreOptions) -> pb.ScoreCandidatesRequest:
        """The ScoreCandidatesRequest for ``sets``; TypeError for anything but CandidateSets."""
        for s in sets:
            if not isinstance(s, CandidateSet):
                raise TypeError(
                    f"a candidate set must be a pairscore.CandidateSet, got {type(s).__name__} "
                    "(score_responses(prompt, responses) builds one)"
                )
        return candidates_request_to_pb(sets, options)

    @staticmethod
    def candidate_results(
        response: pb.ScoreCandidatesResponse, sets: Sequence[CandidateSet]
    ) -> list[CandidateSetResult]:
        """The per-set results of a ScoreCandidatesResponse; checks they answer ``sets``."""
        try:
            results = candidates_response_from_pb(response)
        except ConversionError as exc:
            raise ScoringError(_UNKNOWN, f"cannot read the server's answer: {exc}") from exc
        if len(results) != len(sets):
            raise ScoringError(_UNKNOWN, f"the server answered {len(results)} sets for {len(sets)}")
        for i, (result, s) in enumerate(zip(results, sets, strict=True)):
            if len(result.results) != len(s.candidates):
                raise ScoringError(
                    _UNKNOWN,
                    f"the server answered {len(result.results)} results for set {i}'s "
                    f"{len(s.candidates)} candidates",
                )
        return results

    @staticmethod
    def model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
        """ModelInfo from a GetModelInfoResponse."""
        try:
            return model_info_from_pb(response)
        except ConversionError as exc:
            raise ScoringError(_UNKNOWN, f"cannot read the server's model info: {exc}") from exc

    @staticmethod
    def tokenize_request(texts: Iterable[str], parse_special_tokens: bool) -> tuple[pb.TokenizeRequest, int]:
        """The TokenizeRequest for ``texts`` and how many texts it holds; TypeError for a
        text that is not a str."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        return tokenize_request_to_pb(texts, parse_special_tokens=parse_special_tokens), len(texts)

    @staticmethod
    def token_ids(response: pb.TokenizeResponse, expected: int) -> list[tuple[int, ...]]:
        """Each text's ids from a TokenizeResponse; checks that it answers ``expected`` texts."""
        ids = tokenize_response_from_pb(response)
        if len(ids) != expected:
            raise ScoringError(_UNKNOWN, f"the server answered {len(ids)} token lists for {expected} texts")
        return ids

    @staticmethod
    def health_request(service: str) -> health_pb2.HealthCheckRequest:
        """The grpc.health.v1 request for ``service``."""
        return health_pb2.HealthCheckRequest(service=service)

    @staticmethod
    def health_status(response: health_pb2.HealthCheckResponse) -> str:
        """``"SERVING"``, ``"NOT_SERVING"``, ... from a health response."""
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
