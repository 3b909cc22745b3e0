"""A small synchronous client for a pairscore server.

::

    from pairscore import ScoringClient
    with ScoringClient("localhost:50051") as client:
        for result in client.score([("The capital of France is", " Paris.")]):
            print(result.conditional_logprob)

It needs only grpcio and protobuf (no torch). RPC failures raise
:class:`ScoringError`; a pair that could not be scored comes back as an
:class:`~pairscore.types.ItemError` in its place, the other pairs unaffected.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairscore.convert import model_info_from_pb, request_to_pb, response_from_pb
from pairscore.types import ModelInfo, Pair, ScoreOptions, ScoreOutcome, TokenizationMode
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc

#: Largest message the client sends or receives, unless told otherwise (64 MiB).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: A pair as the client accepts it: a Pair, or a (prompt, response) tuple.
PairLike = Union[Pair, tuple[str, str]]  # noqa: UP007 - a runtime alias on Python 3.10+

_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name


class ScoringError(Exception):
    """An RPC to the pairscore server failed.

    ``code`` is the :class:`grpc.StatusCode` and ``message`` the server's
    explanation (``details``).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ScoringError:
        """Wrap a grpc.RpcError (which is also a grpc.Call)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


def _to_pair(item: PairLike) -> Pair:
    if isinstance(item, Pair):
        return item
    try:
        prompt, response = item
    except (TypeError, ValueError):
        raise TypeError(
            f"a pair must be a pairscore.Pair or a (prompt, response) tuple, got {item!r}"
        ) from None
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise TypeError(f"prompt and response must be str, got {type(prompt)} and {type(response)}")
    return Pair(prompt=prompt, response=response)


class ScoringClient:
    """Synchronous client of ``pairscore.v1.ScoringService``.

    ``target`` is ``host:port``. ``timeout`` is the default deadline of each
    call in seconds (``None``: no deadline). ``max_message_bytes`` bounds
    messages both ways; ``secure=True`` uses TLS with the system roots (or
    pass ``credentials``); ``channel_options`` are extra gRPC channel options.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        secure: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options,
        ]
        if secure or credentials is not None:
            creds = credentials or grpc.ssl_channel_credentials()
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ScoringServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # --- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> ScoringClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # --- RPCs --------------------------------------------------------------------------

    def score(
        self,
        pairs: Iterable[PairLike],
        *,
        tokenization: TokenizationMode = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        timeout: float | None = None,
    ) -> list[ScoreOutcome]:
        """Score pairs in one request; one PairScore or ItemError per pair, in order.

        ``timeout`` overrides the client's default deadline for this call.
        Raises :class:`ScoringError` if the RPC fails.
        """
        request = request_to_pb(
            [_to_pair(p) for p in pairs],
            ScoreOptions(tokenization=tokenization, return_tokens=return_tokens),
        )
        try:
            response = self._stub.Score(request, timeout=self._deadline(timeout))
        except grpc.RpcError as exc:
            raise ScoringError.from_rpc_error(exc) from None
        return response_from_pb(response)

    def score_stream(
        self,
        batches: Iterable[Iterable[PairLike]],
        *,
        tokenization: TokenizationMode = TokenizationMode.SEPARATE,
        return_tokens: bool = False,
        timeout: float | None = None,
    ) -> Iterator[list[ScoreOutcome]]:
        """Stream many requests over one call; yields one result list per batch, in order.

        ``batches`` is consumed lazily, as the server asks for more, so it
        may be a generator over a large data set. ``timeout`` is the deadline
        of the whole stream (default: the client's). Raises
        :class:`ScoringError` if the stream fails.
        """
        options = ScoreOptions(tokenization=tokenization, return_tokens=return_tokens)
        requests = (request_to_pb([_to_pair(p) for p in batch], options) for batch in batches)
        call = self._stub.ScoreStream(requests, timeout=self._deadline(timeout))
        try:
            for response in call:
                yield response_from_pb(response)
        except grpc.RpcError as exc:
            raise ScoringError.from_rpc_error(exc) from None
        finally:
            call.cancel()  # no-op when the stream already ended

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the served model and its scoring contract."""
        try:
            response = self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise ScoringError.from_rpc_error(exc) from None
        return model_info_from_pb(response)

    def health(self, service: str = _SERVICE_NAME, *, timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status of ``service``, e.g. ``"SERVING"``, ``"NOT_SERVING"``.

        ``service=""`` asks about the server as a whole.
        """
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self._deadline(timeout)
            )
        except grpc.RpcError as exc:
            raise ScoringError.from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
