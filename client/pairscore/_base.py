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
    model_info_from_pb,
    request_to_pb,
    response_from_pb,
    tokenize_request_to_pb,
    tokenize_response_from_pb,
)
from pairscore.errors import ScoringError, error_from_rpc
from pairscore.types import (
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
