"""The one implementation behind both clients: conversion, options, deadlines, error mapping.

A client method builds a :class:`Unary` here (the request, the call's keyword
arguments and how to read the answer; all checks happen while building it)
and hands it to its shell to send: :class:`~pairscore.client.ScoringClient`
calls the sync stub, :class:`~pairscore.aio.AsyncScoringClient` awaits the
grpc.aio one. That send is all that differs between the two (the sans-I/O
design of h11 and hyper-h2); ``score_iter``'s drivers are
:mod:`pairscore._stream_sync` and :mod:`pairscore._stream_aio` over the
shared :mod:`pairscore._sequencer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairscore.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SCORING_SERVICE,
    ChannelSettings,
    RetryPolicy,
    TlsConfig,
)
from pairscore.convert import (
    ConversionError,
    RenderChatArgs,
    candidates_request_to_pb,
    candidates_response_from_pb,
    model_info_from_pb,
    render_chat_request_to_pb,
    render_chat_response_from_pb,
    request_to_pb,
    response_from_pb,
    tokenize_request_to_pb,
    tokenize_response_from_pb,
)
from pairscore.errors import ScoringError, error_from_rpc
from pairscore.inputs import (
    PairLike,
    PromptLike,
    ResponseLike,
    candidate_set,
    check_candidate_sets,
    resolve_options,
    to_pair,
)
from pairscore.types import (
    CandidateSet,
    CandidateSetResult,
    ChatMessage,
    ModelInfo,
    ScoreOptions,
    ScoreOutcome,
)
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

#: Default pairs per ScoreStream message in score_iter.
DEFAULT_BATCH_SIZE = 32
#: Default batches per stream that score_iter keeps in flight.
DEFAULT_BATCHES_IN_FLIGHT = 8

_UNKNOWN = grpc.StatusCode.UNKNOWN
T = TypeVar("T")

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_RETRY",
    "SCORING_SERVICE",
    "ClientBase",
    "ClientCore",
    "IterSettings",
    "PairLike",
    "ScoringError",
    "Unary",
    "error_from_rpc",
    "to_pair",
]

#: The retry policy clients use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()


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


@dataclass(frozen=True)
class Unary(Generic[T]):
    """One unary RPC, checked and ready to send: the stub method's name, the request, the
    call's keyword arguments (deadline, metadata, wait_for_ready), and ``read``, which turns
    the answer into the method's result (raising ScoringError for an answer that does not fit)."""

    method: str
    request: Any
    kwargs: dict[str, object]
    read: Callable[[Any], T]


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

    def error(self, exc: grpc.RpcError) -> ScoringError:
        """The typed error of a failed call."""
        return error_from_rpc(exc, secure=self.settings.secure)

    # --- the unary RPCs -----------------------------------------------------------------

    def score(
        self,
        pairs: Iterable[PairLike],
        options: ScoreOptions | None,
        keywords: Mapping[str, Any],
        timeout: float | None,
    ) -> Unary[list[ScoreOutcome]]:
        """Score: one outcome per pair, in order."""
        pairs = list(pairs)
        request = self.request(pairs, resolve_options(options, **keywords))
        return Unary("Score", request, self.call_kwargs(timeout), lambda r: self.outcomes(r, len(pairs)))

    def score_candidates(
        self,
        sets: Iterable[CandidateSet],
        options: ScoreOptions | None,
        keywords: Mapping[str, Any],
        timeout: float | None,
    ) -> Unary[list[CandidateSetResult]]:
        """ScoreCandidates: one CandidateSetResult per set, in order."""
        sets = list(sets)
        check_candidate_sets(sets)
        request = candidates_request_to_pb(sets, resolve_options(options, **keywords))
        return Unary(
            "ScoreCandidates", request, self.call_kwargs(timeout), lambda r: self.candidate_results(r, sets)
        )

    def score_responses(
        self,
        prompt: PromptLike,
        responses: Iterable[ResponseLike],
        options: ScoreOptions | None,
        keywords: Mapping[str, Any],
        timeout: float | None,
    ) -> Unary[list[ScoreOutcome]]:
        """ScoreCandidates of one set: one outcome per response, in order."""
        call = self.score_candidates([candidate_set(prompt, responses)], options, keywords, timeout)
        return Unary(call.method, call.request, call.kwargs, lambda r: list(call.read(r)[0].results))

    def tokenize(
        self, texts: Iterable[str], parse_special_tokens: bool, timeout: float | None
    ) -> Unary[list[tuple[int, ...]]]:
        """Tokenize: each text's ids; TypeError for a text that is not a str."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        request = tokenize_request_to_pb(texts, parse_special_tokens=parse_special_tokens)
        return Unary("Tokenize", request, self.call_kwargs(timeout), lambda r: self.token_ids(r, len(texts)))

    def render_chat(
        self,
        messages: Iterable[ChatMessage | Mapping[str, str]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        include_template: bool,
        timeout: float | None,
    ) -> Unary[tuple[str, str]]:
        """RenderChat: (text, template); TypeError for a message that is neither a
        ChatMessage nor a {"role", "content"} mapping of strings."""
        args = RenderChatArgs(
            messages=tuple(_chat_message(i, m) for i, m in enumerate(messages)),
            add_generation_prompt=bool(add_generation_prompt),
            continue_final_message=bool(continue_final_message),
            include_template=bool(include_template),
        )
        request = render_chat_request_to_pb(args)
        return Unary("RenderChat", request, self.call_kwargs(timeout), render_chat_response_from_pb)

    def model_info(self, timeout: float | None, wait_for_ready: bool | None) -> Unary[ModelInfo]:
        """GetModelInfo."""
        kwargs = self.call_kwargs(timeout, wait_for_ready)
        return Unary("GetModelInfo", pb.GetModelInfoRequest(), kwargs, self.read_model_info)

    def health(self, service: str, timeout: float | None) -> Unary[str]:
        """grpc.health.v1 Check of ``service``: ``"SERVING"``, ``"NOT_SERVING"``..."""
        request = health_pb2.HealthCheckRequest(service=service)
        return Unary("Check", request, self.call_kwargs(timeout), _health_status)

    # --- conversion of requests and answers -------------------------------------------------

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
    def read_model_info(response: pb.GetModelInfoResponse) -> ModelInfo:
        """ModelInfo from a GetModelInfoResponse."""
        try:
            return model_info_from_pb(response)
        except ConversionError as exc:
            raise ScoringError(_UNKNOWN, f"cannot read the server's model info: {exc}") from exc

    @staticmethod
    def token_ids(response: pb.TokenizeResponse, expected: int) -> list[tuple[int, ...]]:
        """Each text's ids from a TokenizeResponse; checks that it answers ``expected`` texts."""
        ids = tokenize_response_from_pb(response)
        if len(ids) != expected:
            raise ScoringError(_UNKNOWN, f"the server answered {len(ids)} token lists for {expected} texts")
        return ids


def _chat_message(index: int, message: ChatMessage | Mapping[str, str]) -> ChatMessage:
    """``message`` as a ChatMessage: one already, or a {"role": ..., "content": ...} mapping
    (what transformers' and lm-evaluation-harness's chat histories hold)."""
    if isinstance(message, ChatMessage):
        return message
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
        if isinstance(role, str) and isinstance(content, str):
            return ChatMessage(role, content)
    raise TypeError(
        f"messages[{index}] must be a pairscore.ChatMessage or a mapping with str 'role' and "
        f"'content', got {message!r:.100}"
    )


def _health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class ClientBase:
    """The constructor and properties both clients share; a subclass opens its kind of
    channel (:meth:`_open`) and sends a :class:`Unary` with it."""

    def __init__(
        self,
        target: str | ChannelSettings,
        *,
        timeout: float | None = 60.0,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        wait_for_ready: bool = False,
        tls: TlsConfig | bool | None = None,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        channel_options: Sequence[tuple[str, object]] = (),
    ) -> None:
        if isinstance(target, ChannelSettings):
            settings = target
        else:
            settings = ChannelSettings(
                target=target,
                tls=tls if tls is not None else (True if secure else None),
                credentials=credentials,
                token=token,
                retry=retry,
                load_balancing=load_balancing,
                max_message_bytes=max_message_bytes,
                channel_options=tuple(channel_options),
            )
        self.target = settings.target
        self._core = ClientCore(settings, timeout=timeout, wait_for_ready=wait_for_ready)
        self._channel = self._open(settings)
        stub = pb_grpc.ScoringServiceStub(self._channel)
        self._stub = stub
        #: The unary methods a Unary names, by name.
        self._rpcs: dict[str, Callable[..., Any]] = {
            "Score": stub.Score,
            "ScoreCandidates": stub.ScoreCandidates,
            "Tokenize": stub.Tokenize,
            "RenderChat": stub.RenderChat,
            "GetModelInfo": stub.GetModelInfo,
            "Check": health_pb2_grpc.HealthStub(self._channel).Check,
        }

    def _open(self, settings: ChannelSettings) -> Any:
        raise NotImplementedError

    @property
    def timeout(self) -> float | None:
        """The default deadline of each call, in seconds."""
        return self._core.timeout

    @property
    def settings(self) -> ChannelSettings:
        """How this client connects."""
        return self._core.settings
