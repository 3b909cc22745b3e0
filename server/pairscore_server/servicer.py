"""gRPC face of the scoring service: message conversion and status codes only.

All scoring logic lives in :class:`pairscore_server.service.ScoringService`;
all protobuf <-> dataclass conversion in :mod:`pairscore.convert`, and the
bound of an answer's encoded size, which the service checks before scoring,
in :mod:`pairscore_server.response_size`. This module maps failures to gRPC
status codes and records per-RPC metrics.

Status codes: the table in :mod:`pairscore_server.errors` (``FAILURES``)
maps each failure the service raises to one; besides it, ``INVALID_ARGUMENT``
for bytes that are not a valid message, ``UNAVAILABLE`` while the model is
still loading, ``DEADLINE_EXCEEDED`` / ``CANCELLED`` when the caller's deadline
passed or it cancelled (its queued pairs never reach the model), and
``INTERNAL`` for an unexpected server bug. A full queue's
``RESOURCE_EXHAUSTED`` carries the ``grpc-retry-pushback-ms`` trailer with the
retry hint, for gRPC's own retry machinery. (gRPC itself also answers
RESOURCE_EXHAUSTED for a message over the size limit, or past
``max_concurrent_rpcs``.)

In ScoreStream every failure that concerns one message (limits, a full
queue, a failed batch, an unknown enum) becomes item errors for that
message's pairs and the stream goes on; a message that cannot be parsed
ends the stream with INVALID_ARGUMENT after the earlier messages are
answered, and shutdown ends it with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from pairscore.convert import (
    ConversionError,
    candidates_request_from_pb,
    candidates_response_to_pb,
    model_info_to_pb,
    render_chat_request_from_pb,
    render_chat_response_to_pb,
    request_from_pb,
    response_to_pb,
    tokenize_request_from_pb,
    tokenize_response_to_pb,
)
from pairscore.types import CandidateSet, ItemError, ItemErrorCode, Pair, ScoreOptions, ScoreOutcome
from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.accounting import REJECT_INVALID, counts_as_deadline
from pairscore_server.engine.chat import ChatError, NoChatTemplateError
from pairscore_server.errors import BatcherClosedError, QueueFullError, failure_for
from pairscore_server.response_size import candidates_response_bound, score_response_bound

if TYPE_CHECKING:
    from pairscore_server.answer_bound import AnswerBound
    from pairscore_server.metrics import Metrics
    from pairscore_server.service import ScoringService

log = logging.getLogger(__name__)

#: Full name of the gRPC service, as health checks and reflection know it.
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ScoringService"].full_name

#: Trailing metadata key of gRPC's retry pushback (milliseconds), see gRFC A6.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"

_Metadata = tuple[tuple[str, str], ...]


class _RpcFailureError(Exception):
    """Ends the RPC with a given status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class MalformedMessage:
    """What the deserializer returns for bytes that are not a valid message."""

    type_name: str
    reason: str

    def error(self) -> _RpcFailureError:
        return _RpcFailureError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {self.type_name} message: {self.reason}",
        )


def _safe_parser(message_type: Any) -> Callable[[bytes], Any]:
    """A deserializer that never raises: bad bytes become a MalformedMessage.

    grpc would otherwise answer UNKNOWN with the parser's exception text.
    """
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, RecursionError, ...
            reason = str(exc).split(":")[-1].strip()[:200] or type(exc).__name__
            return MalformedMessage(name, reason)

    return parse


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str, _Metadata]:
    """The status code, message and trailing metadata that end an RPC which raised ``exc``."""
    if isinstance(exc, _RpcFailureError):
        return exc.code, exc.message, ()
    failure = failure_for(exc)
    if failure is None:
        log.error("unexpected error in an RPC handler", exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__})", ()
    trailers: _Metadata = ()
    if isinstance(exc, QueueFullError):
        trailers = ((RETRY_PUSHBACK_KEY, str(max(1, round(exc.retry_after_s * 1000)))),)
    return grpc.StatusCode[failure.status], failure.message(exc), trailers


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's deadline as a ``time.monotonic()`` value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class _RpcScope:
    """Times one RPC, records its final status, and turns exceptions into status codes."""

    def __init__(self, *, method: str, context: grpc.aio.ServicerContext, metrics: Metrics | None):
        self._method = method
        self._context = context
        self._metrics = metrics
        self._started = 0.0
        self._budget: float | None = None

    async def __aenter__(self) -> _RpcScope:
        self._started = time.perf_counter()
        self._budget = self._context.time_remaining()
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
            expired = counts_as_deadline(self._context.time_remaining(), self._budget)
            self._record(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
            return
        code, message, trailers = _status_for(exc)
        self._record(code)
        # raises AbortError, replacing exc
        await self._context.abort(code, message, trailing_metadata=trailers)


class ScoringServicer(pb_grpc.ScoringServiceServicer):
    """grpc.aio servicer for ``pairscore.v1.ScoringService``.

    It answers ``UNAVAILABLE`` until :meth:`set_service` hands it a ready
    :class:`~pairscore_server.service.ScoringService` (the model loads after
    the server has started, so health checks can be answered meanwhile).
    ``stream_max_in_flight``: request messages of one ScoreStream call in work at
    once (``ServerConfig.stream_max_in_flight``, its default and its check).
    """

    def __init__(
        self,
        *,
        stream_max_in_flight: int,
        service: ScoringService | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._service = service
        self._metrics = metrics
        self._stream_max_in_flight = stream_max_in_flight

    def set_service(self, service: ScoringService) -> None:
        """Start answering scoring RPCs with ``service``."""
        self._service = service

    def _require_service(self) -> ScoringService:
        if self._service is None:
            raise _RpcFailureError(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry later")
        return self._service

    def _scope(self, method: str, context: grpc.aio.ServicerContext) -> _RpcScope:
        return _RpcScope(method=method, context=context, metrics=self._metrics)

    # --- RPCs -------------------------------------------------------------------------

    async def Score(  # noqa: N802 - gRPC method name
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        """Score all pairs of one request; item failures are ItemErrors, not RPC errors."""
        async with self._scope("Score", context):
            if isinstance(request, MalformedMessage):
                raise request.error()
            service = self._require_service()
            pairs, options = self._convert(request)
            outcomes = await service.score(
                pairs, options, answer=_response_bound(service, options), deadline=_deadline(context)
            )
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
            deadline = _deadline(context)
            reader = asyncio.create_task(
                self._read_stream(service, request_iterator, slots, in_order, deadline),
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
            if isinstance(request, MalformedMessage):
                raise request.error()
            return model_info_to_pb(self._require_service().model_info())

    async def ScoreCandidates(  # noqa: N802 - gRPC method name
        self, request: pb.ScoreCandidatesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreCandidatesResponse:
        """Score each set's candidates against its prompt, sent and computed once; item
        failures are ItemErrors in the set's results, failures map to status codes as in Score."""
        async with self._scope("ScoreCandidates", context):
            if isinstance(request, MalformedMessage):
                raise request.error()
            service = self._require_service()
            sets, options = self._convert_candidates(request)
            bytes_per_token = service.model_info().max_token_text_bytes
            answer = candidates_response_bound(sets, options, max_token_text_bytes=bytes_per_token)
            results = await service.score_candidates(
                sets, options, answer=answer, deadline=_deadline(context)
            )
            return candidates_response_to_pb(results)

    def _convert_candidates(
        self, message: pb.ScoreCandidatesRequest
    ) -> tuple[list[CandidateSet], ScoreOptions]:
        """candidates_request_from_pb; a message that cannot be converted counts its
        candidates as rejected."""
        try:
            return candidates_request_from_pb(message)
        except ConversionError:
            n = sum(len(s.candidates) for s in message.sets)
            if self._metrics is not None and n:
                self._metrics.rejected_pairs.labels(reason=REJECT_INVALID).inc(n)
            raise

    async def Tokenize(  # noqa: N802 - gRPC method name
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Tokenize texts with the served tokenizer; limits as Score's (INVALID_ARGUMENT)."""
        async with self._scope("Tokenize", context):
            if isinstance(request, MalformedMessage):
                raise request.error()
            service = self._require_service()
            texts, parse_special_tokens = tokenize_request_from_pb(request)
            return tokenize_response_to_pb(
                await service.tokenize(
                    texts, parse_special_tokens=parse_special_tokens, deadline=_deadline(context)
                )
            )

    async def RenderChat(  # noqa: N802 - gRPC method name
        self, request: pb.RenderChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenderChatResponse:
        """Render a conversation with the model's chat template: FAILED_PRECONDITION for a
        model without one, INVALID_ARGUMENT for a conversation it cannot render; limits
        as Tokenize's."""
        async with self._scope("RenderChat", context):
            if isinstance(request, MalformedMessage):
                raise request.error()
            service = self._require_service()
            try:
                text, template = await service.render_chat(
                    render_chat_request_from_pb(request), deadline=_deadline(context)
                )
            except NoChatTemplateError as exc:
                raise _RpcFailureError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            except ChatError as exc:
                raise _RpcFailureError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            return render_chat_response_to_pb(text, template)

    def _convert(self, message: pb.ScoreRequest) -> tuple[list[Pair], ScoreOptions]:
        """request_from_pb; a message that cannot be converted counts its pairs as rejected."""
        try:
            return request_from_pb(message)
        except ConversionError:
            if self._metrics is not None and message.pairs:
                self._metrics.rejected_pairs.labels(reason=REJECT_INVALID).inc(len(message.pairs))
            raise

    # --- stream helpers -------------------------------------------------------------

    async def _read_stream(
        self,
        service: ScoringService,
        request_iterator: AsyncIterator[pb.ScoreRequest],
        slots: asyncio.Semaphore,
        in_order: asyncio.Queue[asyncio.Task[pb.ScoreResponse] | None],
        deadline: float | None,
    ) -> None:
        """Read request messages while a slot is free; start scoring each at once.

        A message that cannot be parsed ends the reading with INVALID_ARGUMENT
        (the messages before it are still answered).
        """
        messages = aiter(request_iterator)
        try:
            while True:
                await slots.acquire()
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    return
                if isinstance(message, MalformedMessage):
                    raise message.error()
                in_order.put_nowait(
                    asyncio.create_task(self._score_stream_message(service, message, deadline))
                )
        finally:
            in_order.put_nowait(None)

    async def _score_stream_message(
        self, service: ScoringService, message: pb.ScoreRequest, deadline: float | None
    ) -> pb.ScoreResponse:
        """Score one stream message; failures become item errors for its pairs."""
        try:
            pairs, options = self._convert(message)
        except ConversionError as exc:
            failure = failure_for(exc)
            assert failure is not None and failure.item_code is not None
            return response_to_pb(
                _item_errors(
                    [p.id for p in message.pairs], code=failure.item_code, message=failure.message(exc)
                )
            )
        try:
            outcomes = await service.score(
                pairs,
                options,
                answer=_response_bound(service, options),
                deadline=deadline,
                errors_as_items=True,
            )
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


def add_to_server(servicer: ScoringServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` like the generated ``add_ScoringServiceServicer_to_server``,
    but with deserializers that turn malformed bytes into INVALID_ARGUMENT."""
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score,
            request_deserializer=_safe_parser(pb.ScoreRequest),
            response_serializer=pb.ScoreResponse.SerializeToString,
        ),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(
            servicer.ScoreStream,
            request_deserializer=_safe_parser(pb.ScoreRequest),
            response_serializer=pb.ScoreResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=_safe_parser(pb.GetModelInfoRequest),
            response_serializer=pb.GetModelInfoResponse.SerializeToString,
        ),
        "ScoreCandidates": grpc.unary_unary_rpc_method_handler(
            servicer.ScoreCandidates,
            request_deserializer=_safe_parser(pb.ScoreCandidatesRequest),
            response_serializer=pb.ScoreCandidatesResponse.SerializeToString,
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize,
            request_deserializer=_safe_parser(pb.TokenizeRequest),
            response_serializer=pb.TokenizeResponse.SerializeToString,
        ),
        "RenderChat": grpc.unary_unary_rpc_method_handler(
            servicer.RenderChat,
            request_deserializer=_safe_parser(pb.RenderChatRequest),
            response_serializer=pb.RenderChatResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _response_bound(service: ScoringService, options: ScoreOptions) -> AnswerBound:
    """How large the ScoreResponse to a request with ``options`` can be (response_size.py)."""
    return score_response_bound(options, max_token_text_bytes=service.model_info().max_token_text_bytes)
