"""gRPC face of the scoring service: message conversion and status codes only.

All scoring logic lives in :class:`pairscore_server.service.ScoringService`;
all protobuf <-> dataclass conversion in :mod:`pairscore.convert`. This
module maps failures to gRPC status codes and records per-RPC metrics.

Status codes:

* ``INVALID_ARGUMENT`` - the request cannot be read (e.g. an unknown enum value).
* ``UNAVAILABLE`` - the model is still loading, or the server is shutting down.
* ``INTERNAL`` - a forward pass holding this request's pairs failed (Score only;
  in ScoreStream the affected message's pairs get ``INTERNAL`` item errors
  and the stream goes on), or an unexpected server bug.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from pairscore.convert import (
    ConversionError,
    model_info_to_pb,
    request_from_pb,
    response_to_pb,
)
from pairscore.types import ItemError, ItemErrorCode, ScoreOutcome
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.batcher import BatcherClosedError, BatchFailedError

if TYPE_CHECKING:
    from pairscore_server.metrics import Metrics
    from pairscore_server.service import ScoringService

log = logging.getLogger(__name__)

#: Full name of the gRPC service, as health checks and reflection know it.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name

#: Request messages of one ScoreStream call that may be in work at once.
DEFAULT_STREAM_MAX_IN_FLIGHT = 4


class _RpcFailureError(Exception):
    """Ends the RPC with a given status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message that end an RPC which raised ``exc``."""
    if isinstance(exc, _RpcFailureError):
        return exc.code, exc.message
    if isinstance(exc, ConversionError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {exc}"
    if isinstance(exc, BatchFailedError):
        return grpc.StatusCode.INTERNAL, str(exc)
    if isinstance(exc, BatcherClosedError):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    log.error("unexpected error in an RPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__})"


class _RpcScope:
    """Times one RPC, records its final status, and turns exceptions into status codes."""

    def __init__(self, *, method: str, context: grpc.aio.ServicerContext, metrics: Metrics | None):
        self._method = method
        self._context = context
        self._metrics = metrics
        self._started = 0.0

    async def __aenter__(self) -> _RpcScope:
        self._started = time.perf_counter()
        return self

    def _record(self, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.observe_request(
                method=self._method, code=code.name, seconds=time.perf_counter() - self._started
            )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._record(grpc.StatusCode.OK)
            return
        if isinstance(exc, grpc.aio.AbortError):  # someone already called context.abort()
            code = self._context.code()
            self._record(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)
            return
        if not isinstance(exc, Exception):
            # CancelledError/GeneratorExit: the client cancelled, its deadline passed,
            # or the server is shutting down.
            remaining = self._context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self._record(
                grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            )
            return
        code, message = _status_for(exc)
        self._record(code)
        await self._context.abort(code, message)  # raises AbortError, replacing exc


class ScoringServicer(pb_grpc.ScoringServiceServicer):
    """grpc.aio servicer for ``pairscore.v1.ScoringService``.

    It answers ``UNAVAILABLE`` until :meth:`set_service` hands it a ready
    :class:`~pairscore_server.service.ScoringService` (the model loads after
    the server has started, so health checks can be answered meanwhile).
    """

    def __init__(
        self,
        *,
        service: ScoringService | None = None,
        metrics: Metrics | None = None,
        stream_max_in_flight: int = DEFAULT_STREAM_MAX_IN_FLIGHT,
    ) -> None:
        if stream_max_in_flight < 1:
            raise ValueError(f"stream_max_in_flight must be >= 1, got {stream_max_in_flight}")
        self._service = service
        self._metrics = metrics
        self._stream_max_in_flight = stream_max_in_flight

    def set_service(self, service: ScoringService) -> None:
        """Start answering scoring RPCs with ``service``."""
        self._service = service

    def _require_service(self) -> ScoringService:
        if self._service is None:
            raise _RpcFailureError(
                grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry later"
            )
        return self._service

    def _scope(self, method: str, context: grpc.aio.ServicerContext) -> _RpcScope:
        return _RpcScope(method=method, context=context, metrics=self._metrics)

    # --- RPCs -------------------------------------------------------------------------

    async def Score(  # noqa: N802 - gRPC method name
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        """Score all pairs of one request; item failures are ItemErrors, not RPC errors."""
        async with self._scope("Score", context):
            service = self._require_service()
            pairs, options = request_from_pb(request)
            outcomes = await service.score(pairs, options)
            return response_to_pb(outcomes)

    async def ScoreStream(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """One response per request message, in order, with several messages in work at once.

        At most ``stream_max_in_flight`` messages are read but not yet
        answered; the server reads no further until one is answered, which
        pushes back on the client through gRPC flow control.
        """
        async with self._scope("ScoreStream", context):
            service = self._require_service()
            slots = asyncio.Semaphore(self._stream_max_in_flight)
            in_order: asyncio.Queue[asyncio.Task[pb.ScoreResponse] | None] = asyncio.Queue()
            reader = asyncio.create_task(
                self._read_stream(service, request_iterator, slots, in_order),
                name="pairscore-stream-reader",
            )
            try:
                while (task := await in_order.get()) is not None:
                    response = await task
                    yield response
                    slots.release()
                await reader  # surfaces a failure of the reader
            finally:
                reader.cancel()
                while not in_order.empty():
                    leftover = in_order.get_nowait()
                    if leftover is not None:
                        leftover.cancel()

    async def GetModelInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """Describe the served model and the scoring contract."""
        async with self._scope("GetModelInfo", context):
            return model_info_to_pb(self._require_service().model_info())

    # --- stream helpers -------------------------------------------------------------

    async def _read_stream(
        self,
        service: ScoringService,
        request_iterator: AsyncIterator[pb.ScoreRequest],
        slots: asyncio.Semaphore,
        in_order: asyncio.Queue[asyncio.Task[pb.ScoreResponse] | None],
    ) -> None:
        """Read request messages while a slot is free; start scoring each at once."""
        messages = aiter(request_iterator)
        try:
            while True:
                await slots.acquire()
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    return
                in_order.put_nowait(
                    asyncio.create_task(self._score_stream_message(service, message))
                )
        finally:
            in_order.put_nowait(None)

    async def _score_stream_message(
        self, service: ScoringService, message: pb.ScoreRequest
    ) -> pb.ScoreResponse:
        """Score one stream message; failures become item errors for its pairs."""
        try:
            pairs, options = request_from_pb(message)
        except ConversionError as exc:
            return response_to_pb(
                _item_errors(
                    [p.id for p in message.pairs],
                    code=ItemErrorCode.INVALID_ARGUMENT,
                    message=f"invalid request: {exc}",
                )
            )
        try:
            outcomes = await service.score(pairs, options, batch_errors_as_items=True)
        except BatcherClosedError:
            raise
        except Exception as exc:
            log.error("scoring a stream message failed", exc_info=exc)
            outcomes = _item_errors(
                [p.id for p in pairs],
                code=ItemErrorCode.INTERNAL,
                message=f"internal server error ({type(exc).__name__})",
            )
        return response_to_pb(outcomes)


def _item_errors(ids: list[str], *, code: ItemErrorCode, message: str) -> list[ScoreOutcome]:
    return [ItemError(code=code, message=message, id=i) for i in ids]
